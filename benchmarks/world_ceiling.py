"""How much of pi_init's loss is imitation, and how much is capability? (docs/world.md, #4 room)

DPO can only remove what the SFT model does by habit, learned from its demonstrations.
This re-runs the build's SFT step from the cached *pretrained* checkpoint on demonstrations
with chosen defects switched off (all of them by default: perfect answers only), and
measures that model's gold win rate over pi_init exactly as world_check measures a DPO
policy (same evaluation prompts and pi_init samples). A habit-free SFT model is the
ceiling of what preference data can teach this 2.7M model; if DPO on 100% of the gold
pairs is already near it, no recipe for the 100% arm can open more room.

    python benchmarks/world_ceiling.py --seeds 0                   # perfect demonstrations
    python benchmarks/world_ceiling.py --seeds 0 --clean confusion  # only the decoy habit off

Prints a table and writes runs/world_ceiling/<stamp>/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from world_check import log, sample, win_rates  # noqa: E402
from spa_ray.tasks.embedded import EmbeddedTask  # noqa: E402
from spa_ray.tasks.embedded.build import (  # noqa: E402
    BuildSpec, _sft_batches, _train, build_embedded_model,
)
from spa_ray.tasks.embedded.world import DemoQuality  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--clean", nargs="+", default=list(DemoQuality().as_dict()),
                    help="defects switched off in the demonstrations (default: all)")
    ap.add_argument("--eval-prompts", type=int, default=500)
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = EmbeddedTask()
    path = Path(build_embedded_model(args.cache_dir, task=task))
    pretrained = build_embedded_model(args.cache_dir, task=task, which="pretrained")
    spec = BuildSpec()
    built = json.loads((path.parent / "build.json").read_text())["spec"]["train"]
    if built != dataclasses.asdict(spec.train):
        raise SystemExit(f"{path.parent / 'build.json'}: the cached build's train spec differs from BuildSpec()")
    tok = AutoTokenizer.from_pretrained(path)
    init = AutoModelForCausalLM.from_pretrained(path).eval()
    quality = {k: (0.0 if k in args.clean else v) for k, v in DemoQuality().as_dict().items()}
    clean_task = EmbeddedTask(quality=quality)
    demos = clean_task.sft_demonstrations(spec.train.sft_demos, seed=spec.train.seed)
    log(f"SFT again from {pretrained} on {len(demos)} demonstrations with {args.clean} off")
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    batches, _ = _sft_batches(tok, demos, spec.train, random.Random(spec.train.seed))
    t0 = time.time()
    _train(model, batches, spec.train.sft_lr, spec.train, log, "sft (clean)")
    sft_seconds = time.time() - t0
    results = []
    for seed in args.seeds:
        prompts = task.prompt_splits(seed).evaluation[: args.eval_prompts]
        ref = sample(init, tok, prompts, args.eval_samples, 0.7, 10_000 + seed)
        again = sample(init, tok, prompts, args.eval_samples, 0.7, 20_000 + seed)
        ours = sample(model, tok, prompts, args.eval_samples, 0.7, 50_000 + seed)
        results.append({"seed": seed, "sft_vs_itself": win_rates(task, prompts, again, ref, args.eval_samples),
                        "clean_sft": win_rates(task, prompts, ours, ref, args.eval_samples)})
        log(f"seed {seed}: {results[-1]['clean_sft']}")
    out = Path(args.out or f"runs/world_ceiling/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "quality": quality, "sft_seconds": sft_seconds,
                                                  "results": results}, indent=2))
    print("\n| seed | defects off | win rate over pi_init | LC | mean gold | pi_init mean gold | errors (content/count/repetition) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        c, s = r["clean_sft"], r["sft_vs_itself"]
        e = c["error_rates"]
        print(f"| {r['seed']} | {' '.join(args.clean)} | {c['win_rate']:.3f} | {c['lc_win_rate']:.3f} | "
              f"{c['mean_gold']:.2f} | {s['mean_gold']:.2f} | {e.get('content', 0):.2f} / {e.get('count', 0):.2f} / "
              f"{e.get('repetition', 0):.2f} |")
    print(f"\nwrote {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
