"""Judging: our batched, length-bucketed judge vs a plain per-pair transformers loop.

The data are real self-generated pairs: two samples per prompt (temperature 0.7) of the
embedded SFT model on iteration-1 prompts, made at the start of the run with the project's
transformers generator. The judge policy and reference are both loaded from the model
folder (pi_{t-1} and pi_init have the same shape, so the work is the same as in a run).

Sides (interleaved A B A B ..., same rows, same models, same threads):
- `batched`: ``actors.judge.JudgeActor.label`` (outside Ray): length buckets of at most
  ``judge.max_tokens_per_batch`` (8192) padded tokens, one policy and one reference forward
  per bucket, then Eq. 7-8 labels.
- `per_pair_loop`: for each pair and response, ``model(ids).logits`` -> log_softmax ->
  gather the response tokens -> sum, for the policy and the reference, then the same
  labels: what a straightforward script does.
- `batched_reuse`: ``label`` with the generator's own log pi_{t-1} passed in
  (``judge.reuse_generator_logprobs``): only the reference forward runs.

Sequences/s counts scored responses (2 per pair). Floor: useful forward FLOPs per response
(the LM head on response positions only, no padding) x models run, against this machine's
matmul rate measured in the same run with the same threads.

    python benchmarks/bench_judge.py              # 300 prompts = 600 responses
    python benchmarks/bench_judge.py --toy --reps 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def make_rows(path: str, prompts: list[str], device: str, max_new_tokens: int) -> list[dict]:
    from spa_ray.generation.base import SamplingConfig
    from spa_ray.generation.transformers_backend import TransformersGenerator

    gen = TransformersGenerator(path, device=device, max_batch_size=64)
    seqs = gen.generate(prompts, SamplingConfig(n=2, temperature=0.7, max_new_tokens=max_new_tokens, seed=0))
    rows = []
    for i in range(len(prompts)):
        a, b = seqs[2 * i], seqs[2 * i + 1]
        rows.append({
            "prompt_ids": a.prompt_ids, "response_ids_1": a.response_ids, "response_ids_2": b.response_ids,
            "policy_logp_1": float(sum(a.raw_logprobs)), "policy_logp_2": float(sum(b.raw_logprobs)),
        })
    return rows


def per_pair_loop(policy, reference, rows, beta: float, device: str) -> list[dict]:
    """The plain loop: one sequence, one model at a time."""
    import torch

    from spa_ray.judging.implicit_reward import implicit_reward, label_pairs

    def logp(model, prompt, response):
        ids = torch.tensor([list(prompt) + list(response)], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        return float(lp.gather(-1, ids[0, len(prompt):, None]).sum())

    with torch.no_grad():
        pol, ref = [], []
        for key in ("response_ids_1", "response_ids_2"):
            for row in rows:
                pol.append(logp(policy, row["prompt_ids"], row[key]))
                ref.append(logp(reference, row["prompt_ids"], row[key]))
    pol_t, ref_t = torch.tensor(pol), torch.tensor(ref)
    r = implicit_reward(pol_t, ref_t, beta)
    n = len(rows)
    labels = label_pairs(r[:n], r[n:])
    return [{"first_is_chosen": bool(labels.first_is_chosen[i]), "probability": float(labels.probability[i])}
            for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.common_args(ap, default_reps=7)
    bc.add_model_arg(ap)
    ap.add_argument("--prompts", type=int, default=300, help="pairs to judge (2 responses each)")
    ap.add_argument("--max-tokens-per-batch", type=int, default=8192, help="judge.max_tokens_per_batch")
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--reference", default=None,
                    help="judge reference model folder (default: the embedded build's pretrained model)")
    args = ap.parse_args(argv)
    threads = bc.set_threads(args.threads)
    if args.toy:
        args.prompts, args.reps = min(args.prompts, 12), min(args.reps, 2)

    import torch
    from transformers import AutoConfig

    from spa_ray.actors.judge import JudgeActor

    path = bc.model_path(args)
    config = AutoConfig.from_pretrained(path)
    peak = bc.matmul_peak_flops(threads, args.device)
    bc.log(f"generating {args.prompts} x 2 responses")
    rows = make_rows(path, bc.embedded_prompts(args.prompts), args.device, args.max_new_tokens)
    plain_rows = [{k: v for k, v in r.items() if not k.startswith("policy_logp")} for r in rows]

    # The reference must differ from the policy (pi_{t-1} vs pi_init), or every reward is 0 and
    # every pair a tie: the embedded build's pretrained-only model sits next to its SFT model.
    reference_path = args.reference or (str(Path(path).parent / "pretrained")
                                         if (Path(path).parent / "pretrained" / "config.json").exists() else path)
    judge = JudgeActor(policy_path=path, reference_path=reference_path, beta=0.1,
                       max_tokens_per_batch=args.max_tokens_per_batch, device=args.device)
    policy, reference = judge.policy, judge.reference

    # The three sides agree on every label (the loop is the reference implementation).
    batched_labels = judge.label(plain_rows)
    loop_labels = per_pair_loop(policy, reference, rows, 0.1, args.device)
    agree = sum(a["first_is_chosen"] == b["first_is_chosen"] for a, b in zip(batched_labels, loop_labels)) / len(rows)
    reuse_labels = judge.label(rows)
    agree_reuse = sum(a["first_is_chosen"] == b["first_is_chosen"] for a, b in zip(batched_labels, reuse_labels)) / len(rows)

    sides = {
        "batched": lambda: judge.label(plain_rows),
        "per_pair_loop": lambda: per_pair_loop(policy, reference, rows, 0.1, args.device),
        "batched_reuse": lambda: judge.label(rows),
    }
    bc.log(f"timing {args.reps} interleaved rounds of {list(sides)}")
    wall = bc.interleaved(sides, reps=args.reps, warmup=0, device=args.device)
    times = dict(bc.LAST_CPU_TIMES) if args.device == "cpu" else wall

    n_seq = 2 * len(rows)
    lengths = [(len(r["prompt_ids"]), len(r[k])) for r in rows for k in ("response_ids_1", "response_ids_2")]
    fwd = sum(bc.llama_forward_flops(config, p + y, scored_positions=y) for p, y in lengths)
    padded = 0
    from spa_ray.models.scoring import length_buckets

    totals = [p + y for p, y in lengths]
    for bucket in length_buckets(totals, args.max_tokens_per_batch):
        padded += len(bucket) * max(totals[i] for i in bucket)
    info = bc.header("judge", threads, args.device, {
        "model": f"{path} ({config.hidden_size}h x {config.num_hidden_layers}L, vocab {config.vocab_size})",
        "reference": reference_path,
        "matmul_peak_GFLOP_per_cpu_s": round(peak / 1e9, 2),
        "timing": "CPU seconds of the process to label all pairs (wall seconds in the CSV)",
        "pairs": len(rows),
        "mean_tokens_per_sequence": round(sum(totals) / len(totals), 1),
        "padding_share_batched": round(1 - sum(totals) / padded, 3),
        "label_agreement_batched_vs_loop": agree,
        "label_agreement_reuse_vs_batched": agree_reuse,
        "loadavg_end": bc.loadavg(),
    })
    base = bc.med(times["per_pair_loop"])
    rows_out = []
    for side, models in (("batched", 2), ("per_pair_loop", 2), ("batched_reuse", 1)):
        t = times[side]
        achieved = fwd * models / bc.med(t)
        rows_out.append({
            "side": side, "threads": threads, "forwards_per_seq": models,
            "cpu_s_median": bc.med(t), "cpu_s_range": bc.spread(t),
            "seq_per_cpu_s": n_seq / bc.med(t), "seq_per_cpu_s_range": bc.spread([n_seq / x for x in t]),
            "wall_s_median": bc.med(wall[side]), "wall_s_range": bc.spread(wall[side]),
            "speed_vs_loop": base / bc.med(t), "speed_vs_batched": bc.med(times["batched"]) / bc.med(t),
            "achieved_GFLOP_per_cpu_s": achieved / 1e9, "achieved_over_peak": achieved / peak,
        })
    cols = ["side", "threads", "forwards_per_seq", "cpu_s_median", "cpu_s_range", "seq_per_cpu_s", "speed_vs_loop",
            "speed_vs_batched", "wall_s_median", "achieved_GFLOP_per_cpu_s", "achieved_over_peak"]
    bc.print_table("Judge: batched length-bucketed vs per-pair loop; reuse of generator log-probs", info, rows_out, cols)
    bc.write_csv(args.out or bc.DEFAULT_OUT / ("judge_toy.csv" if args.toy else "judge.csv"), info, rows_out)
    del torch
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
