"""Generation: 1 vs 2 generator actors on this machine (scaling efficiency).

Two Ray pools of ``actors.GeneratorActor`` (transformers backend; `--backend vllm` on a
GPU) built once: one actor, and two actors, each actor reserving one CPU (or one GPU) and
running `--threads` torch threads. Each round generates the same prompts (2 samples each,
temperature 0.7, at most 300 new tokens, fixed seed) on pool 1 and pool 2, interleaved
A B A B ... . Samples are seeded per (prompt, sample), so both pools produce the SAME
tokens: the work is equal by construction (checked).

Scaling efficiency = (tokens/s with 2 actors) / (2 x tokens/s with 1 actor). On a machine
whose 2 cores are shared with other users, two actors can only be as fast as the cores
they actually get: the load average is printed next to the figures.

    python benchmarks/bench_generation.py                 # 200 prompts, 5 rounds
    python benchmarks/bench_generation.py --toy --reps 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.common_args(ap, default_reps=5)
    bc.add_model_arg(ap)
    bc.add_generation_args(ap)
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--actors", type=int, nargs=2, default=[1, 2], help="the two pool sizes compared")
    args = ap.parse_args(argv)
    if args.toy:
        args.prompts, args.reps = min(args.prompts, 8), min(args.reps, 1)

    import ray

    from spa_ray.actors.generator import GeneratorActor, generate_rows
    from spa_ray.actors.pool import ShardedActors
    from spa_ray.pipeline.config import ActorGroup

    path = bc.model_path(args)
    prompts = bc.embedded_prompts(args.prompts)
    gpu = args.device.startswith("cuda")
    small, large = args.actors
    bc.ray_init(num_cpus=small + large, num_gpus=(small + large) if gpu else None,
                include_dashboard=False, log_to_driver=False)
    try:
        kwargs = dict(backend=args.backend, model_path=path, version=0, device=args.device, dtype="auto",
                      num_threads=args.threads)
        if args.backend == "transformers":
            kwargs["max_batch_size"] = args.batch_size
        group = dict(num_cpus=1.0, num_gpus=1.0 if gpu else 0.0)
        pools = {
            f"{n}_actor{'s' if n > 1 else ''}": ShardedActors(
                GeneratorActor, ActorGroup(count=n, **group), kwargs, name=f"gen{n}", progress=False)
            for n in (small, large)
        }
        for pool in pools.values():
            pool.wait_ready()
        sampling = dict(n=2, temperature=0.7, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)
        outputs: dict[str, list] = {}

        def run(name):
            def go():
                outputs[name] = generate_rows(pools[name], prompts, sampling)
            return go

        bc.log(f"timing {args.reps} interleaved rounds: {list(pools)} on {len(prompts)} prompts")
        times = bc.interleaved({name: run(name) for name in pools}, reps=args.reps, warmup=1, device="cpu")
        names = list(pools)
        same = [r["response_ids"] for r in outputs[names[0]]] == [r["response_ids"] for r in outputs[names[1]]]
        tokens = sum(len(r["response_ids"]) for r in outputs[names[0]])
    finally:
        ray.shutdown()

    info = bc.header("generation", args.threads, args.device, {
        "model": path, "backend": args.backend, "prompts": len(prompts), "responses": 2 * len(prompts),
        "response_tokens": tokens, "identical_samples_both_pools": same,
        "cores": __import__("os").cpu_count(), "loadavg_end": bc.loadavg(),
    })
    base = bc.med(times[names[0]])
    rows = []
    for name, n in zip(names, (small, large)):
        t = times[name]
        tps = tokens / bc.med(t)
        rows.append({
            "pool": name, "actors": n, "threads_per_actor": args.threads,
            "seconds_median": bc.med(t), "seconds_range": bc.spread(t),
            "tokens_per_s": tps, "tokens_per_s_range": bc.spread([tokens / x for x in t]),
            "speedup": base / bc.med(t), "scaling_efficiency": base / bc.med(t) / (n / small),
        })
    cols = ["pool", "actors", "threads_per_actor", "seconds_median", "seconds_range", "tokens_per_s",
            "tokens_per_s_range", "speedup", "scaling_efficiency"]
    bc.print_table("Generation: 1 vs 2 generator actors (same prompts, same seeds)", info, rows, cols)
    bc.write_csv(args.out or bc.DEFAULT_OUT / ("generation_toy.csv" if args.toy else "generation.csv"), info, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
