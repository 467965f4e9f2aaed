"""End to end: one SPA iteration on the embedded default, Ray actors vs one sequential process.

Both sides start from the same state -- a run directory where prepare, the pi_init
evaluation, the seed DPO (pi_0) and its evaluation are finished (built once per `--root`;
`training.seed_epochs` 1 there to save time, which changes only pi_0's quality) -- and do
iteration 1 of Algorithm 1 on the same data:

  health check (held-out gold pairs) -> generate 2 samples for each X_1 prompt with pi_0
  -> label by the implicit reward (pi_0 vs pi_init) -> refined DPO (1 epoch, lambda 1/2,
  init = ref = pi_0) -> evaluate pi_1 (gold win rate vs pi_init on the evaluation prompts)

- `ray_default`: the project's stage functions (``pipeline.stages``) on a local Ray
  cluster with the embedded default placement (1 generator, 1 judge, 1 DeepSpeed
  trainer worker); actor pools are created inside the timed iteration (cold, as for
  iteration 1 of a run; ray.init itself is not timed).
- `ray_2actors` (`--two-actors`): the same with 2 generators and 2 judges.
- `sequential`: the same library functions in THIS process, no Ray, no actors, no
  DeepSpeed, no run-directory ledger or telemetry: load pi_0 and pi_init, generate,
  score, a plain torch AdamW loop over ``preference_step``, save pi_1, evaluate. This is
  how the official SPA code runs (one script per stage, one process each).

Sides alternate (A B A B ...); each repetition is a fresh copy of the base run. Per-stage
times are reported for each side so the overhead can be located.

    python benchmarks/bench_e2e.py                 # X_1 = the embedded default (1,000 prompts), 2 rounds
    python benchmarks/bench_e2e.py --toy --reps 1  # the tiny model and a few prompts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

STAGES = ("health", "generate", "judge", "train", "evaluate")


def base_overrides(args, root: Path, name: str, iterations: int) -> list[str]:
    o = [f"run.root={root}", f"run.name={name}", f"run.iterations={iterations}",
         "training.seed_epochs=1", "judge.health_floor=0.0", "audit.pairs=0",
         # the loop below is the paper's (every pair trained on), at the lr of the earlier tables
         "judge.keep_fraction=1", "training.learning_rate=3e-6"]
    if args.model:
        o.append(f"model.name_or_path={args.model}")
    if args.prompts is not None:
        sizes = ", ".join([str(args.prompts)] * max(iterations, 2))
        o.append(f"data.task_kwargs={{n_iterations: [{sizes}]}}")
    if args.toy:
        o += ["evaluation.num_prompts=4", "generation.max_new_tokens=24", "training.global_batch_size=4",
              "training.micro_batch_size=2", "judge.max_tokens_per_batch=512"]
    return o


def ensure_base(args, root: Path):
    """The run directory with everything before iteration 1 finished (built once)."""
    from spa_ray.pipeline.config import load_config
    from spa_ray.pipeline.driver import run_spa

    config = load_config(None, base_overrides(args, root, "base", 0))
    if not (root / "base" / "stages.json").exists() or '"eval_pi_0"' not in (root / "base" / "stages.json").read_text():
        bc.log(f"building the base run (prepare, eval init, seed DPO, eval pi_0) in {root / 'base'}")
        with contextlib.redirect_stdout(sys.stderr):
            run_spa(config)
    return config


def fresh_copy(root: Path, name: str) -> Path:
    dst = root / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(root / "base", dst, ignore=shutil.ignore_patterns("ray_train", "tensorboard"))
    (dst / "config.yaml").unlink()  # the copy is its own run (name differs); same settings otherwise
    return dst


# ----------------------------------------------------------------------------- Ray side
def ray_iteration(args, root: Path, name: str, extra: list[str]) -> dict[str, float]:
    """Iterations 1..T in one job (one Run: actors and the trainer group stay up). The
    stage times reported are the LAST iteration's (warm); each iteration's total too."""
    from spa_ray.models.loading import load_checkpoint_state_dict, state_dict_checksum
    from spa_ray.pipeline.config import load_config
    from spa_ray.pipeline import stages as S

    run_dir = fresh_copy(root, name)
    config = load_config(None, base_overrides(args, root, name, args.iterations) + extra)
    times: dict[str, float] = {}
    with contextlib.redirect_stdout(sys.stderr), S.Run.open(config) as run:
        t0 = time.perf_counter()
        data = S.prepare_data(run)
        run.start_trainer_early()  # as run_spa does
        pi = run.checkpoint(0)
        for it in range(1, args.iterations + 1):
            start = time.perf_counter()
            S.check_judge_health(run, it, data)
            times["health"] = time.perf_counter() - start
            t = time.perf_counter()
            gens = S.generate_responses(run, it, prompts=data.iteration_prompts[it - 1])
            times["generate"] = time.perf_counter() - t
            t = time.perf_counter()
            pairs = S.judge_pairs(run, it, gens)
            times["judge"] = time.perf_counter() - t
            t = time.perf_counter()
            pi = S.train_policy(run, t=it, policy=pi, pairs=pairs)
            times["train"] = time.perf_counter() - t
            t = time.perf_counter()
            summary = S.evaluate(run, policy=pi, version=it + 1, name=f"pi_{it}")
            times["evaluate"] = time.perf_counter() - t
            times[f"iter{it}_s"] = time.perf_counter() - start
        times["total"] = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [m for m in metrics if m.get("kind") == "stage" and m.get("stage") == f"train_{args.iterations}"][-1]
    times["train_steps_s"] = train["step_seconds"]
    times["train_fixed_s"] = train["fixed_seconds"]
    times["train_from_memory"] = float(train["from_memory"])
    times["win_rate"] = summary.get("win_rate", math.nan)
    times["checksum"] = state_dict_checksum(load_checkpoint_state_dict(pi))
    return times


# ---------------------------------------------------------------------- sequential side
def sequential_iteration(args, root: Path, name: str, config) -> dict[str, float]:
    """Iterations 1..T in this process with the same library functions and no Ray."""
    from types import SimpleNamespace

    from spa_ray.data.tables import read_json
    from spa_ray.judging.implicit_reward import implicit_reward
    from spa_ray.models.loading import load_causal_lm, load_checkpoint_state_dict, load_tokenizer, state_dict_checksum
    from spa_ray.models.scoring import batched_policy_reference_logprobs
    from spa_ray.tasks.base import load_task

    run_dir = fresh_copy(root, name)
    out = run_dir / "sequential"
    out.mkdir()
    cfg, g, j, tr = config, config.generation, config.judge, config.training
    task = load_task(cfg.data.task, **cfg.data.task_kwargs)
    pi_init = cfg.model.name_or_path or str(task.default_model())
    pi_0 = str(run_dir / "checkpoints" / "pi_0")
    prompts = read_json(run_dir / "data" / "prepare" / "prompts.json")
    times: dict[str, float] = {}

    def score(policy, reference, p_ids, r_ids):
        pol, ref = batched_policy_reference_logprobs(policy, reference, p_ids, r_ids, pad,
                                                     max_tokens_per_batch=j.max_tokens_per_batch)
        return implicit_reward(pol, ref, j.beta)

    t0 = time.perf_counter()
    tok = load_tokenizer(pi_init)
    pad = tok.pad_token_id
    policy = load_causal_lm(pi_0, dtype="auto", device="cpu")
    init = load_causal_lm(pi_init, dtype="auto", device="cpu")
    env = SimpleNamespace(policy=policy, init=init, score=score, times=times, run_dir=run_dir, out=out, cfg=cfg, g=g,
                          tr=tr, task=task, prompts=prompts, pad=pad, tok=tok, pi_0=pi_0)
    for it in range(1, args.iterations + 1):
        start = time.perf_counter()
        env.policy = _sequential_one(it, env)
        times[f"iter{it}_s"] = time.perf_counter() - start
    times["total"] = time.perf_counter() - t0
    times["checksum"] = state_dict_checksum(load_checkpoint_state_dict(out / f"pi_{args.iterations}"))
    return times


def _sequential_one(it: int, env):
    """Iteration ``it`` of the sequential side (``env``: the models, data and paths it shares);
    returns pi_it."""
    import copy

    import torch
    from transformers import get_cosine_schedule_with_warmup

    from spa_ray.data.collate import collate_preference_pairs
    from spa_ray.data.tables import read_parquet, write_parquet
    from spa_ray.data.tokenize import TokenizedPair, TokenizedSequence
    from spa_ray.evaluation.win_rates import gold_win_rate
    from spa_ray.generation.base import SamplingConfig
    from spa_ray.generation.transformers_backend import TransformersGenerator
    from spa_ray.judging.implicit_reward import label_pairs
    from spa_ray.models.loading import load_tokenizer
    from spa_ray.objectives.confidence_window import ConfidenceWindow
    from spa_ray.objectives.noise_detection import lambda_for_iteration
    from spa_ray.pipeline.stages import EVAL_SEED_OFFSET
    from spa_ray.training.batch_plan import BatchPlan, group_by_length
    from spa_ray.training.preference_step import preference_step

    policy, init, score, times, run_dir, out = env.policy, env.init, env.score, env.times, env.run_dir, env.out
    cfg, g, tr, task, prompts, pad, tok, pi_0 = env.cfg, env.g, env.tr, env.task, env.prompts, env.pad, env.tok, env.pi_0
    t0 = time.perf_counter()
    hold = read_parquet(run_dir / "data" / "prepare" / "judge_holdout.parquet")
    n = len(hold["prompt_ids"])
    r = score(policy, init, hold["prompt_ids"] * 2, hold["chosen_ids"] + hold["rejected_ids"])
    lab = label_pairs(r[:n], r[n:])
    _health = float((lab.first_is_chosen.float() + 0.5 * lab.is_tie.float()).mean())
    times["health"] = time.perf_counter() - t0

    t = time.perf_counter()
    gen_tok = load_tokenizer(pi_0, padding_side="left")
    policy.eval()
    generator = TransformersGenerator.from_model(policy, gen_tok, max_batch_size=g.batch_size)
    x1 = prompts["iterations"][it - 1]
    seqs = generator.generate(x1, SamplingConfig(n=2, temperature=g.temperature, top_p=g.top_p,
                                                 max_new_tokens=g.max_new_tokens, seed=cfg.run.seed * 100 + it))
    write_parquet(out / f"generations_{it}.parquet", {
        "prompt": [x1[s.prompt_index] for s in seqs], "prompt_ids": [s.prompt_ids for s in seqs],
        "response_ids": [s.response_ids for s in seqs], "text": [s.text for s in seqs]})
    times["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    first, second = seqs[0::2], seqs[1::2]
    m = len(first)
    r = score(policy, init, [s.prompt_ids for s in first] * 2,
              [s.response_ids for s in first] + [s.response_ids for s in second])
    lab = label_pairs(r[:m], r[m:])
    cols: dict[str, list] = {k: [] for k in ("prompt", "prompt_ids", "chosen_ids", "rejected_ids", "chosen", "rejected")}
    for i in range(m):
        if bool(lab.is_tie[i]):
            continue
        w, lo = (first[i], second[i]) if bool(lab.first_is_chosen[i]) else (second[i], first[i])
        cols["prompt"].append(x1[w.prompt_index])
        cols["prompt_ids"].append(w.prompt_ids)
        cols["chosen_ids"].append(w.response_ids)
        cols["rejected_ids"].append(lo.response_ids)
        cols["chosen"].append(w.text)
        cols["rejected"].append(lo.text)
    cols["gold_chosen"] = task.score_many(cols["prompt"], cols["chosen"])
    cols["gold_rejected"] = task.score_many(cols["prompt"], cols["rejected"])
    write_parquet(out / f"pairs_{it}.parquet", cols)
    times["judge"] = time.perf_counter() - t

    t = time.perf_counter()
    reference = copy.deepcopy(policy)  # init = ref = pi_{t-1}
    reference.requires_grad_(False)
    reference.eval()
    policy.train()
    plan = BatchPlan(num_pairs=len(cols["prompt_ids"]), global_batch_size=tr.global_batch_size,
                     micro_batch_size=tr.micro_batch_size, world_size=1, epochs=tr.iteration_epochs,
                     seed=cfg.run.seed * 100 + it)
    torch.manual_seed(plan.seed * 7919)  # as the trainer's rank 0 seeds each stage
    opt = torch.optim.AdamW(policy.parameters(), lr=tr.learning_rate, weight_decay=tr.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(tr.warmup_ratio * plan.total_steps), plan.total_steps)
    window = ConfidenceWindow(tr.confidence_window, tr.k_percent, tr.denoise_warmup)
    lam = lambda_for_iteration(it, first=tr.lambda_first)

    def seq(p, y):
        ids = list(p) + list(y)
        return TokenizedSequence(input_ids=ids, attention_mask=[1] * len(ids),
                                 response_mask=[False] * len(p) + [True] * len(y),
                                 prompt_len=len(p), response_len=len(y))

    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"])]
    for step in range(plan.total_steps):
        for micro in group_by_length(plan.micro_batches(step, 0), lengths):  # as the worker does
            items = [TokenizedPair(chosen=seq(cols["prompt_ids"][i], cols["chosen_ids"][i]),
                                   rejected=seq(cols["prompt_ids"][i], cols["rejected_ids"][i])) for i in micro]
            batch = collate_preference_pairs(items, pad)
            res = preference_step(policy, reference, batch, beta=tr.beta, refine=True, alpha=tr.alpha, lam=lam,
                                  window=window, step=step, total_steps=plan.total_steps,
                                  chunk_size=tr.noise_chunk_size, pad_token_id=pad)
            (res.loss / plan.accumulation_steps).backward()
        if tr.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), tr.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    policy.eval()
    policy.save_pretrained(out / f"pi_{it}", safe_serialization=True)
    tok.save_pretrained(out / f"pi_{it}")
    times["train"] = time.perf_counter() - t

    t = time.perf_counter()
    ev = prompts["evaluation"][: cfg.evaluation.num_prompts]
    samples = generator.generate(ev, SamplingConfig(n=cfg.evaluation.samples_per_prompt, temperature=g.temperature,
                                                    top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                                                    seed=cfg.run.seed + EVAL_SEED_OFFSET))
    mine = task.score_many([ev[s.prompt_index] for s in samples], [s.text for s in samples])
    base = read_parquet(run_dir / "eval" / "baseline" / "samples.parquet")
    times["win_rate"] = gold_win_rate(mine, base["gold"])
    times["evaluate"] = time.perf_counter() - t
    return policy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.common_args(ap, default_reps=2)
    bc.add_model_arg(ap)
    ap.add_argument("--prompts", type=int, default=None, help="|X_1| (default: the embedded default, 1,000)")
    ap.add_argument("--root", type=Path, default=None, help="where the base and per-round runs live")
    ap.add_argument("--two-actors", action="store_true", help="also time Ray with 2 generators and 2 judges")
    ap.add_argument("--trainer-threads", type=int, default=None,
                    help="also time Ray with placement.trainer.threads=N (the trainer on the cores idle in training)")
    ap.add_argument("--no-ray-default", action="store_true", help="skip the ray_default side")
    ap.add_argument("--iterations", type=int, default=2,
                    help="SPA iterations per job; the stage columns are the last (warm) iteration's")
    ap.add_argument("--seq-threads", default="1,2",
                    help="torch threads of the sequential side, one side each; the best is the baseline")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        bc.log("note: --device cuda places the Ray actors on GPUs via placement; the sequential side stays on CPU")
    if args.toy:
        args.prompts = args.prompts or 8
        if not args.model:
            args.model = bc.model_path(args)
    os.environ.setdefault("SPA_RAY_THREADS", str(args.threads))
    threads = bc.set_threads(args.threads)
    root = (args.root or bc.DEFAULT_OUT / ("e2e_toy" if args.toy else "e2e")).resolve()
    root.mkdir(parents=True, exist_ok=True)

    import ray

    for attempt in range(6):  # on an overloaded machine the raylet can miss Ray's 30 s start window
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
            bc.log(f"ray.init failed ({exc}); retrying")
            with contextlib.suppress(Exception):
                ray.shutdown()
            if attempt == 5:
                raise
    try:
        config = ensure_base(args, root)
        sides = {} if args.no_ray_default else {"ray_default": lambda k: ray_iteration(args, root, f"ray_default_{k}", [])}
        if args.trainer_threads:
            extra = [f"placement.trainer.threads={args.trainer_threads}"]
            sides[f"ray_trainer_{args.trainer_threads}t"] = lambda k: ray_iteration(
                args, root, f"ray_trainer_{args.trainer_threads}t_{k}", extra)
        for n in [int(x) for x in args.seq_threads.split(",")]:
            def sequential(k, n=n):
                bc.set_threads(n)
                try:
                    return sequential_iteration(args, root, f"sequential_{n}t_{k}", config)
                finally:
                    bc.set_threads(threads)
            sides[f"sequential_{n}t"] = sequential
        if args.two_actors:
            two = ["placement.generators.count=2", "placement.judges.count=2"]
            sides["ray_2actors"] = lambda k: ray_iteration(args, root, f"ray_2actors_{k}", two)
        results: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
        names = list(sides)
        for k in range(args.reps):
            for s in (names if k % 2 == 0 else names[::-1]):
                bc.log(f"round {k}: {s}")
                results[s].append(sides[s](k))
                bc.log(f"round {k}: {s} {results[s][-1]['total']:.1f}s")
    finally:
        ray.shutdown()

    info = bc.header("e2e", threads, args.device, {
        "x_t_prompts": args.prompts or 1000, "rounds": args.reps, "iterations": args.iterations,
        "base": "embedded default at the paper's setting (judge.keep_fraction 1, lr 3e-6); seed DPO 1 epoch; "
                "judge.health_floor 0; no label audit (the loop has none)",
        "cores": os.cpu_count(), "loadavg_end": bc.loadavg(),
    })
    seq_sides = [n for n in names if n.startswith("sequential")]
    best_seq = min(seq_sides, key=lambda n: bc.med([r["total"] for r in results[n]]))
    seq_total = bc.med([r["total"] for r in results[best_seq]])
    its = [f"iter{i}_s" for i in range(1, args.iterations + 1)]
    rows = []
    for s in names:
        rs = results[s]
        totals = [r["total"] for r in rs]
        row = {"side": s, "total_s_median": bc.med(totals), "total_s_range": bc.spread(totals),
               "speed_vs_best_sequential": seq_total / bc.med(totals)}
        for key in its:
            row[key] = bc.med([r[key] for r in rs])
        for st in STAGES:
            row[f"{st}_s"] = bc.med([r[st] for r in rs])
        for st in STAGES:  # what the distribution adds to each stage, against the best sequential loop
            row[f"{st}_over_seq_s"] = row[f"{st}_s"] - bc.med([r[st] for r in results[best_seq]])
        if s.startswith("ray"):
            row["train_steps_s"] = bc.med([r["train_steps_s"] for r in rs])
            row["train_fixed_s"] = bc.med([r["train_fixed_s"] for r in rs])
            row["train_from_memory"] = min(r["train_from_memory"] for r in rs)
        row["win_rate_last"] = bc.med([r["win_rate"] for r in rs])
        row["final_checksum"] = rs[-1]["checksum"][:12]
        row["same_final_weights_as_best_seq"] = all(r["checksum"] == results[best_seq][0]["checksum"] for r in rs)
        rows.append(row)
    info["best_sequential"] = best_seq
    cols = ["side", "total_s_median", "total_s_range", "speed_vs_best_sequential"] + its + \
        [f"{st}_s" for st in STAGES] + [f"{st}_over_seq_s" for st in STAGES] + \
        ["train_steps_s", "train_fixed_s", "train_from_memory", "win_rate_last", "final_checksum",
         "same_final_weights_as_best_seq"]
    bc.print_table("End to end: SPA iterations in one job, Ray actors vs one sequential process", info, rows, cols)
    bc.write_csv(args.out or bc.DEFAULT_OUT / ("e2e_toy.csv" if args.toy else "e2e.csv"), info, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
