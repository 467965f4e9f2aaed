"""Generation: vLLM against the transformers backend, same prompts, same model, one actor each.

Needs vLLM: on CPU the .venv-vllm environment (README, "The vLLM environment"), on a GPU
the `gpu` extra (`--device cuda`). Two GeneratorActors on the embedded model (or
`--model`), one per backend, each reserving one CPU (or one GPU):

- engine start: seconds from asking Ray for the actor to its first answer (model load,
  and for vLLM the engine core and worker processes, KV cache and warm-up);
- generation: the same prompts (2 samples each, temperature 0.7, at most
  `--max-new-tokens`, fixed seed), timed interleaved A B A B ... after one warm-up round;
  tokens/s counts the response tokens each backend produced (their samples differ: two
  RNGs), so the rate, not the seconds, is what compares;
- weight update into each actor (`--reps` times): the object-store route (one `ray.put`,
  the actor copies in / sends bytes to vLLM's workers) and the checkpoint reload.

    python benchmarks/bench_vllm.py               # 200 prompts, 5 rounds
    python benchmarks/bench_vllm.py --toy --reps 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.common_args(ap, default_reps=5)
    bc.add_model_arg(ap)
    bc.add_generation_args(ap)
    args = ap.parse_args(argv)
    if args.toy:
        args.prompts, args.reps = min(args.prompts, 8), min(args.reps, 1)

    import ray

    from spa_ray.weights.packing import pack_state_dict
    from spa_ray.actors.generator import GeneratorActor
    from spa_ray.models.loading import load_checkpoint_state_dict, state_dict_checksum

    path = bc.model_path(args)
    prompts = bc.embedded_prompts(args.prompts)
    gpu = args.device.startswith("cuda")
    bc.ray_init(num_cpus=2, num_gpus=2 if gpu else None, include_dashboard=False, log_to_driver=False)
    try:
        opts = dict(num_cpus=1.0, num_gpus=1.0 if gpu else 0.0)
        base = dict(model_path=path, version=0, device=args.device, dtype="auto", num_threads=args.threads)
        specs = {"transformers": dict(max_batch_size=args.batch_size), "vllm": {}}
        actors, start_s = {}, {}
        for name, extra in specs.items():  # one after the other: start-up is timed alone
            t0 = time.perf_counter()
            actors[name] = ray.remote(GeneratorActor).options(**opts).remote(backend=name, **base, **extra)
            ray.get(actors[name].ping.remote())
            start_s[name] = time.perf_counter() - t0
            bc.log(f"{name}: actor ready in {start_s[name]:.1f} s")
        sampling = dict(n=2, temperature=0.7, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)
        outputs: dict[str, list] = {}

        def run(name):
            def go():
                outputs[name] = ray.get(actors[name].generate.remote(prompts, sampling=sampling))
            return go

        bc.log(f"timing {args.reps} interleaved rounds on {len(prompts)} prompts")
        times = bc.interleaved({name: run(name) for name in actors}, reps=args.reps, warmup=1, device="cpu")

        sd = load_checkpoint_state_dict(path)
        checksum = state_dict_checksum(sd)
        ref = ray.put(pack_state_dict(sd))
        update = {name: {"object_store": [], "checkpoint_reload": []} for name in actors}
        for rep in range(args.reps):
            for name, actor in actors.items():
                t0 = time.perf_counter()
                ray.get(actor.load_weights.remote(ref, 2 * rep + 1, checksum, path))
                update[name]["object_store"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ray.get(actor.reload_from_checkpoint.remote(path, 2 * rep + 2))
                update[name]["checkpoint_reload"].append(time.perf_counter() - t0)
        lengths = {name: sum(len(r["response_ids"]) for r in rows) for name, rows in outputs.items()}
    finally:
        ray.shutdown()

    info = bc.header("vllm_vs_transformers", args.threads, args.device, {
        "model": path, "prompts": len(prompts), "responses": 2 * len(prompts), "max_new_tokens": args.max_new_tokens,
        "weights_mb": round(sum(t.numel() * t.element_size() for t in sd.values()) / 1e6, 2),
        "cores": __import__("os").cpu_count(), "loadavg_end": bc.loadavg(),
    })
    rows = []
    for name in actors:
        t = times[name]
        rows.append({
            "backend": name, "engine_start_s": start_s[name], "response_tokens": lengths[name],
            "seconds_median": bc.med(t), "seconds_range": bc.spread(t),
            "tokens_per_s": lengths[name] / bc.med(t), "tokens_per_s_range": bc.spread([lengths[name] / x for x in t]),
            "update_object_store_s": bc.med(update[name]["object_store"]),
            "update_checkpoint_reload_s": bc.med(update[name]["checkpoint_reload"]),
        })
    tps = {r["backend"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        r["tokens_per_s_vs_transformers"] = r["tokens_per_s"] / tps["transformers"]
    cols = ["backend", "engine_start_s", "response_tokens", "seconds_median", "seconds_range", "tokens_per_s",
            "tokens_per_s_range", "tokens_per_s_vs_transformers", "update_object_store_s", "update_checkpoint_reload_s"]
    bc.print_table("Generation: vLLM vs transformers (one actor each, same prompts and model)", info, rows, cols)
    bc.write_csv(args.out or bc.DEFAULT_OUT / ("vllm_toy.csv" if args.toy else "vllm.csv"), info, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
