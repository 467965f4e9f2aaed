"""Start a run from another run's seed stage: copy everything up to pi_0 instead of redoing it.

Ablations of the iterations (which judge, which reference, self-refinement on or off, a
length penalty, more iterations) all begin with the same stages: the data splits, pi_init's
evaluation, DPO on the seed (pi_0) and pi_0's evaluation. On the embedded default the seed
DPO alone is ~40% of a run. ``run.start_from: <run dir>`` copies those finished stages,
their ledger entries and their telemetry lines from another run, then the driver goes on
as if it had made them itself (resume logic is unchanged: they are simply finished).

Copying is only correct when every setting those stages read is equal, so the two configs
may differ ONLY in ``ITERATION_SETTINGS``; anything else (data, model, seed, the seed DPO's
training settings, generation and evaluation settings, placement, variants) is refused
with the list of differing keys. Placement is refused too although it should not change
results: a GPU run copied from a CPU run is a comparison the user should make on purpose.
``weight_sync`` (how weights travel to the actors) may differ: every route ends with each
actor's checksum equal to the checkpoint's, so no result can depend on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from spa_ray.config.tree import ConfigError, differing_keys
from spa_ray.pipeline.run_dir import RunDirectory, read_metrics_file

__all__ = ["SEED_STAGES", "ITERATION_SETTINGS", "seed_stage_differences", "adopt_seed_stages"]

#: the stages before SPA's loop, in the order the driver runs them
SEED_STAGES = ("prepare", "eval_baseline", "eval_init", "train_0", "eval_pi_0")

#: settings read only after pi_0's evaluation (a section name covers all its keys)
ITERATION_SETTINGS = frozenset({
    "run.name", "run.root", "run.iterations", "run.start_from",
    "judge", "audit", "generation.responses_per_prompt", "training.seed_replay",
    "training.self_refine", "training.decoupled_noise_detection", "training.alpha", "training.k_percent",
    "training.lambda_first", "training.denoise_warmup", "training.confidence_window", "training.iteration_epochs",
})


#: settings that move weights without changing them (checksums verified on every route)
TRANSPORT_SETTINGS = frozenset({"weight_sync"})


def seed_stage_differences(source: dict, config: dict) -> list[str]:
    """Keys (dotted) whose values differ between two resolved configs and that a seed stage reads."""
    return differing_keys(source, config, ignore=ITERATION_SETTINGS | TRANSPORT_SETTINGS)


def _read_source(source: Path) -> tuple[Path, dict, dict, list[dict]]:
    """(folder, ledger entries, resolved config, metrics records) of the source run, read only:
    the source may still be running its iterations, so nothing there is touched."""
    from spa_ray.pipeline.config import config_to_dict, load_config

    source = source.resolve()
    ledger_path, config_path = source / RunDirectory.LEDGER, source / "config.yaml"
    if not ledger_path.is_file() or not config_path.is_file():
        raise ConfigError(f"run.start_from: {source} is not a run directory (no stages.json and config.yaml)")
    try:
        finished = json.loads(ledger_path.read_text(encoding="utf-8"))["finished"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"run.start_from: {ledger_path}: unreadable stage ledger ({exc})") from None
    missing = [s for s in SEED_STAGES if s not in finished]
    if missing:
        raise ConfigError(f"run.start_from: {source} has not finished its seed stages ({', '.join(missing)} missing)")
    return source, finished, config_to_dict(load_config(config_path)), read_metrics_file(source / "metrics.jsonl")


def adopt_seed_stages(run_dir: RunDirectory, source: str | Path, config: dict) -> list[str]:
    """Copy ``source``'s seed stages into ``run_dir`` (those not finished there yet); returns their names.

    ``config`` is this run's resolved config as a plain dict. Each stage is copied to a
    temporary folder and renamed into place before its ledger entry is written, so a run
    killed while copying resumes the copy.
    """
    todo = [s for s in SEED_STAGES if not run_dir.is_done(s)]
    if not todo:
        return []
    beyond = [s for s in run_dir.finished_stages() if s not in SEED_STAGES]
    if beyond:  # cannot happen through the driver (seed stages come first); refuse rather than mix
        raise ConfigError(f"run.start_from: {run_dir.path} already has later stages ({', '.join(beyond)})")
    src, finished, source_config, records = _read_source(Path(source))
    diffs = seed_stage_differences(source_config, config)
    if diffs:
        raise ConfigError(
            f"run.start_from: {src} was made with other settings for its seed stages ({', '.join(diffs)} "
            "differ); only iteration settings may differ (spa_ray/pipeline/start_from.py ITERATION_SETTINGS)"
        )
    for stage in todo:
        info = dict(finished[stage])
        rel = info.pop("path")
        info.pop("finished_at", None)
        run_dir.adopt_stage(stage, src / rel, rel, copied_from=str(src), **info)
        for record in records:  # its telemetry lines (a kill right here loses only these)
            if record.get("stage") == stage:
                run_dir.append_metrics({**{k: v for k, v in record.items() if k != "time"}, "copied_from": str(src)})
    print(f"spa-ray: copied {', '.join(todo)} from {src} (run.start_from)", flush=True)
    return todo
