"""The driver side of a variant: what a training stage needs before the trainer starts.

``stages.train_policy`` calls :func:`prepare_variant_stage` once per stage with the
``TrainStageSpec`` it built. For ``variant.name: spa`` (and for stages the variant does
not cover) the spec comes back unchanged. Otherwise the per-stage inputs are written into
the stage's own (atomic) output folder and the spec points at them:

- sp2dpo: ``variant_pairs.parquet`` = the pairs plus ``category``, ``magnitude``,
  ``confidence`` (the annotation) and ``beta`` (beta_i from the training beta);
- s_sppo: ``variant_pairs.parquet`` = the pairs plus ``win_prob`` (the judge's
  p(y_w > y_l); 1 for gold seed pairs) and ``similarity`` (embedding cosine); SPA's
  self-refinement is off for this loss form;
- sspo: ``unpaired.parquet`` (the unpaired pool);
- wdro_dpo: nothing on disk, only the settings.
``variant.json`` in the same folder records what was done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from spa_ray.config.tree import ConfigError


def _applies(stages: str, t: int) -> bool:
    return stages == "all" or (stages == "seed" and t == 0) or (stages == "iterations" and t >= 1)


def prepare_variant_stage(run: Any, t: int, spec: Any, out: Path) -> Any:
    """The stage's TrainStageSpec with the variant resolved (unchanged for SPA)."""
    cfg = run.config.variant
    if cfg.name == "spa" or not _applies(cfg.stages, t):
        return spec
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = {"sp2dpo": _sp2dpo, "s_sppo": _s_sppo, "sspo": _sspo, "wdro_dpo": _wdro}[cfg.name]
    spec, info = handler(run, t, spec, out, cfg)
    (out / "variant.json").write_text(json.dumps({"variant": cfg.name, "stage": t, **info}, indent=2) + "\n")
    if hasattr(run, "telemetry"):
        print(f"spa-ray: train_{t}: variant {cfg.name}: {json.dumps(info)}", file=sys.stderr)
    return spec


def _read(path: str) -> dict[str, list]:
    from spa_ray.training.pairs_table import read_pairs

    return read_pairs(path)


def _write(path: Path, table: dict[str, list]) -> str:
    from spa_ray.training.pairs_table import write_pairs

    write_pairs(path, table)
    return str(path)


def _sp2dpo(run, t, spec, out, cfg):
    import torch

    from spa_ray.objectives.sp2dpo import category_multiplier, sp2dpo_beta
    from spa_ray.variants.annotators import annotate_pairs

    table = _read(spec.pairs_path)
    if cfg.sp2dpo.annotator == "teacher" and hasattr(run, "pause_trainer"):
        run.pause_trainer()  # the teacher's Ray task may need the CPUs/GPUs the trainer group holds
    try:
        notes = annotate_pairs(cfg.sp2dpo, run.task, table["prompt"], table["chosen"], table["rejected"],
                               trust_remote_code=run.config.model.trust_remote_code)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    c = torch.tensor([category_multiplier(a.category) for a in notes], dtype=torch.float64)
    m = torch.tensor([a.magnitude for a in notes], dtype=torch.float64)
    k = torch.tensor([a.confidence for a in notes], dtype=torch.float64)
    beta = sp2dpo_beta(spec.beta, c, m, k)
    table.update(category=[a.category for a in notes], magnitude=m.tolist(), confidence_annotated=k.tolist(),
                 annotation_source=[a.source for a in notes], beta=beta.tolist())
    path = _write(out / "variant_pairs.parquet", table)
    spec = dataclasses.replace(spec, pairs_path=path, variant={"name": "sp2dpo"})
    counts: dict[str, int] = {}
    for a in notes:
        counts[a.category] = counts.get(a.category, 0) + 1
    info = {"pairs": len(notes), "beta_mean": float(beta.mean()), "beta_min": float(beta.min()),
            "beta_max": float(beta.max()), "categories": counts,
            "fallback_annotations": sum(a.source == "fallback" for a in notes)}
    return spec, info


def _s_sppo(run, t, spec, out, cfg):
    from spa_ray.variants.embedder import MissingEmbedderError, SentenceEmbedder

    s = cfg.s_sppo
    table = _read(spec.pairs_path)
    n = len(table["prompt_ids"])
    win = [float(p) for p in table["probability"]] if "probability" in table else [1.0] * n
    note = None
    try:
        similarity = SentenceEmbedder(s.embedder).similarity(table["chosen"], table["rejected"])
    except MissingEmbedderError as exc:
        if s.missing_embedder == "error":
            raise ConfigError(str(exc)) from None
        note = f"embedder missing, semantic gate OFF (gate 0): {exc}"
        print(f"spa-ray: WARNING: train_{t}: {note}", file=sys.stderr)
        similarity = [math.nan] * n
    table.update(win_prob=win, similarity=similarity)
    path = _write(out / "variant_pairs.parquet", table)
    variant = {"name": "s_sppo", "gate_low": s.gate_low, "gate_high": s.gate_high,
               "repulsion_weight": s.repulsion_weight, "repulsion_margin": s.repulsion_margin}
    spec = dataclasses.replace(spec, pairs_path=path, variant=variant, refine=False, lam=0.0)
    finite = [x for x in similarity if not math.isnan(x)]
    info = {"pairs": n, "similarity_mean": sum(finite) / len(finite) if finite else None,
            "gated_pairs": sum(x > s.gate_low for x in finite), "self_refine": "off (SPPO loss form)"}
    if note:
        info["note"] = note
    return spec, info


def _sspo(run, t, spec, out, cfg):
    from spa_ray.data.tables import read_json, read_parquet
    from spa_ray.variants.unpaired import self_unpaired, sft_unpaired, write_unpaired

    s = cfg.sspo
    n_pairs = len(_read(spec.pairs_path)["prompt_ids"])
    if s.unpaired_source == "self":
        if t == 0:
            return spec, {"note": "unpaired_source=self has no samples at the seed stage: plain DPO"}
        gen = read_parquet(run.dir.path / "data" / f"iter_{t}" / "generations" / "generations.parquet")
        cols = self_unpaired(gen, s.num_unpaired)
        if not cols["prompt_ids"]:
            raise ConfigError(
                "variant.sspo.unpaired_source=self needs generation.responses_per_prompt >= 3 "
                "(samples beyond the pair's two are the unpaired pool)"
            )
    else:
        from spa_ray.models.loading import load_tokenizer

        n = s.num_unpaired or 4 * n_pairs
        prompts = read_json(run.dir.path / "data" / "prepare" / "prompts.json")
        tokenizer = load_tokenizer(run.pi_init, trust_remote_code=run.config.model.trust_remote_code)
        try:
            cols = sft_unpaired(run.task, tokenizer, n, seed=run.config.run.seed * 100 + t,
                                exclude_prompts=set(prompts["evaluation"]),
                                max_prompt_len=run.config.model.max_prompt_len,
                                max_total_len=run.config.model.max_total_len)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    write_unpaired(out / "unpaired.parquet", cols)
    variant = {"name": "sspo", "beta": s.beta, "ema_momentum": s.ema_momentum, "decay": s.decay,
               "grid_size": s.grid_size, "unpaired_per_micro_batch": s.unpaired_per_micro_batch,
               "unpaired_path": str(out / "unpaired.parquet")}
    spec = dataclasses.replace(spec, variant=variant)
    n_u = len(cols["prompt_ids"])
    return spec, {"pairs": n_pairs, "unpaired": n_u, "source": s.unpaired_source,
                  "g_min": n_pairs / (n_pairs + n_u)}


def _wdro(run, t, spec, out, cfg):
    w = cfg.wdro
    variant = {"name": "wdro_dpo", "xi_min": w.xi_min, "eps_fraction": w.eps_fraction,
               "weight_cap": w.weight_cap, "exclude_noisy": w.exclude_noisy}
    return dataclasses.replace(spec, variant=variant), {k: v for k, v in variant.items() if k != "name"}


__all__ = ["prepare_variant_stage"]
