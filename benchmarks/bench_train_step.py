"""Training step: our refined-DPO step (SPA's noise detection included) vs TRL's DPOTrainer step.

Equal work on both sides: the same model (two copies of the same weights each: policy and
frozen reference), the same micro-batches of the same token ids (the embedded task's gold
seed pairs, tokenised as the driver does), float32, `--threads` torch threads, and the same
optimizer step (torch AdamW after gradient clipping at 1.0). One step = collate B pairs,
policy forward on chosen+rejected, reference forward, loss, backward, clip, AdamW step.

Sides (interleaved A B A B ..., each on its own copies of the models):
- `spa_refined`: ``training.preference_step.preference_step(refine=True, lam=0.5)`` with a
  full confidence window past warm-up (z computed for every pair, as in iteration 1),
  plus the per-pair confidence/z read-back the worker does.
- `trl_dpo`: TRL ``DPOTrainer.training_step`` (sigmoid loss, its own collator
  ``DataCollatorForPreference``, its fused LM head and its metrics), then the same
  clip + AdamW step.
- `spa_dpo` (reference row): our step with refine=False, to show what the SPA extras cost.
- `spa_refined_zero2` (`--deepspeed`): our step through a DeepSpeed ZeRO-2 engine on one
  gloo rank, which is how ``training/worker.py`` runs it by default; `spa_refined_zero0`
  the same engine at ``training.zero_stage=0`` (no partitioning: what one CPU rank needs).

Floors: useful FLOPs per pair = 3 x forward (policy forward + backward) + 1 x forward
(reference), for chosen and rejected, counting the LM head only where a log-prob is needed
(response positions) and no padding; achieved/peak against this machine's dense matmul rate
measured in the same run with the same threads.

Peak memory: each side in a fresh subprocess (glibc told to return freed blocks, so RSS
follows live memory): the high-water mark of one step above the resident set before it
(weights, AdamW state and reference already resident). On CUDA: max_memory_allocated.

    python benchmarks/bench_train_step.py                  # B = 8 and 32, 9 rounds
    python benchmarks/bench_train_step.py --toy --reps 2   # smoke run
    python benchmarks/bench_train_step.py --device cuda    # on a GPU (not measured here)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

SIDES = ("spa_refined", "trl_dpo", "spa_refined_ungrouped", "spa_dpo", "spa_refined_zero2", "spa_refined_zero0")


def global_batches(pairs, global_batch: int, seed: int = 0) -> list[list[tuple]]:
    """Shuffled pairs cut into optimizer steps of `global_batch` pairs (as BatchPlan does)."""
    import random

    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    out = [[pairs[i] for i in order[k : k + global_batch]] for k in range(0, len(order) - global_batch + 1, global_batch)]
    return out or [pairs[:global_batch]]


def split_micro(items: list[tuple], micro: int, grouped: bool) -> list[list[tuple]]:
    """The step's micro-batches: in plan order, or regrouped by length as the worker does
    (``training.batch_plan.group_by_length``)."""
    from spa_ray.training.batch_plan import group_by_length

    plan = [list(range(k, min(k + micro, len(items)))) for k in range(0, len(items), micro)]
    if grouped:
        plan = group_by_length(plan, [len(p) + max(len(c), len(r)) for p, c, r in items])
    return [[items[i] for i in mb] for mb in plan]


def _load_pair(path: str, device: str):
    import torch

    from spa_ray.models.loading import load_causal_lm

    policy = load_causal_lm(path, dtype="float32", device=device)
    reference = load_causal_lm(path, dtype="float32", device=device)
    reference.requires_grad_(False)
    reference.eval()
    policy.train()
    return policy, reference, torch


def make_spa_side(path, tokenizer, data, device, micro, refine=True, zero_stage=None, grouped=True, lr=1e-6):
    from spa_ray.data.collate import collate_preference_pairs
    from spa_ray.data.tokenize import TokenizedPair, TokenizedSequence
    from spa_ray.objectives.confidence_window import ConfidenceWindow
    from spa_ray.training.preference_step import preference_step

    policy, reference, torch = _load_pair(path, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    model = policy
    deepspeed_engine = zero_stage is not None
    if deepspeed_engine:
        model = _zero_engine(policy, optimizer, len(data[0]), micro, zero_stage)
    window = ConfidenceWindow(size=50, k_percent=10.0, warmup_fraction=0.2)
    window.update(torch.rand(50, generator=torch.Generator().manual_seed(0)))
    state = {"i": 0}
    pad = tokenizer.pad_token_id

    def seq(prompt, response):
        ids = list(prompt) + list(response)
        return TokenizedSequence(
            input_ids=ids, attention_mask=[1] * len(ids),
            response_mask=[False] * len(prompt) + [True] * len(response),
            prompt_len=len(prompt), response_len=len(response),
        )

    def step():
        items = data[state["i"] % len(data)]
        state["i"] += 1
        micro_batches = split_micro(items, micro, grouped)
        for mb in micro_batches:
            pairs = [TokenizedPair(chosen=seq(p, c), rejected=seq(p, r)) for p, c, r in mb]
            batch = {k: v.to(device) for k, v in collate_preference_pairs(pairs, pad).items()}
            out = preference_step(
                model, reference, batch, beta=0.1, refine=refine, alpha=0.1, lam=0.5,
                window=window if refine else None, step=1000, total_steps=1001, pad_token_id=pad,
            )
            if deepspeed_engine:
                model.backward(out.loss)
                model.step()
            else:
                (out.loss / len(micro_batches)).backward()
            if out.z is not None:  # what the worker reads back per pair
                out.confidence.tolist(), out.z.tolist()
        if not deepspeed_engine:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _zero_engine(policy, optimizer, global_batch: int, micro: int, stage: int):
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        import socket

        with socket.socket() as sock:  # a free port: other users' jobs hold the usual ones
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if next(policy.parameters()).is_cuda else "gloo", rank=0, world_size=1)
    config = {
        "train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": global_batch // micro,
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9, "wall_clock_breakdown": False, "gradient_clipping": 1.0,
    }
    with contextlib.redirect_stdout(sys.stderr):
        engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=config, dist_init_required=False)
    engine.train()
    return engine


def make_trl_side(path, tokenizer, data, device, micro, lr=1e-6):
    import logging

    from datasets import Dataset
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    hf_logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    policy, reference, torch = _load_pair(path, device)
    text = [tokenizer.decode(p) for p, _, _ in data[0]]
    dataset = Dataset.from_dict({"prompt": text, "chosen": ["x"] * len(text), "rejected": ["y"] * len(text)})
    tmp = tempfile.mkdtemp(prefix="bench-trl-")
    config = DPOConfig(
        output_dir=tmp, per_device_train_batch_size=micro, gradient_accumulation_steps=len(data[0]) // micro,
        learning_rate=lr, beta=0.1, gradient_checkpointing=False,
        use_cpu=device == "cpu", report_to="none", logging_steps=10**9, save_strategy="no",
        bf16=False, fp16=False, seed=0, max_length=None, max_grad_norm=1.0,
    )
    with contextlib.redirect_stdout(sys.stderr):
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=tokenizer)
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=lr)
    trainer.optimizer = optimizer
    trainer.current_gradient_accumulation_steps = len(data[0]) // micro
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    model = trainer.model
    model.train()
    state = {"i": 0}

    def step():
        items = data[state["i"] % len(data)]
        state["i"] += 1
        for mb in split_micro(items, micro, grouped=False):  # TRL's sampler order
            inputs = collator([{"prompt_ids": list(p), "chosen_ids": list(c), "rejected_ids": list(r)} for p, c, r in mb])
            trainer.training_step(model, inputs)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_side(name, path, tokenizer, data, device, micro):
    if name == "spa_refined":
        return make_spa_side(path, tokenizer, data, device, micro, refine=True)
    if name == "spa_refined_ungrouped":
        return make_spa_side(path, tokenizer, data, device, micro, refine=True, grouped=False)
    if name == "spa_dpo":
        return make_spa_side(path, tokenizer, data, device, micro, refine=False)
    if name == "spa_refined_zero2":
        return make_spa_side(path, tokenizer, data, device, micro, refine=True, zero_stage=2)
    if name == "spa_refined_zero0":  # training.zero_stage=0: the engine without ZeRO's partitioning
        return make_spa_side(path, tokenizer, data, device, micro, refine=True, zero_stage=0)
    if name == "trl_dpo":
        return make_trl_side(path, tokenizer, data, device, micro)
    raise ValueError(name)


def padding_share(data, micro: int, grouped: bool) -> float:
    """Share of the forward's token slots that are padding (chosen and rejected stacked)."""
    real = slots = 0
    for items in data:
        for mb in split_micro(items, micro, grouped):
            T = max(len(p) + max(len(c), len(r)) for p, c, r in mb)
            slots += 2 * len(mb) * T
            real += sum(2 * len(p) + len(c) + len(r) for p, c, r in mb)
    return 1 - real / slots


def pair_flops(config, data) -> float:
    """Mean useful training FLOPs per pair over the batches (see the module docstring)."""
    total = n = 0
    for items in data:
        for p, c, r in items:
            for resp in (c, r):
                f = bc.llama_forward_flops(config, len(p) + len(resp), scored_positions=len(resp))
                total += 4 * f  # policy forward + backward (2x) + reference forward
            n += 1
    return total / n


# --------------------------------------------------------------------------- breakdown
def breakdown(args, path, tok, micro: int, steps: int = 10) -> list[dict]:
    """CPU time per component of our refined step at one micro-batch (the profile behind
    docs/performance.md): collate, policy forward, reference forward, sequence log-probs,
    extrapolated log-probs (noise detection), loss, backward, clip, AdamW."""
    import time

    import torch

    from spa_ray.data.collate import collate_preference_pairs
    from spa_ray.data.tokenize import TokenizedPair, TokenizedSequence
    from spa_ray.objectives.logprobs import sequence_logprobs
    from spa_ray.objectives.noise_detection import extrapolated_sequence_logprobs
    from spa_ray.training.preference_step import concat_preference_batch

    pairs = bc.embedded_gold_pairs(tok, micro * (steps + 4))
    rows = []
    for grouped in (False, True):
        data = [mb for items in global_batches(pairs, 4 * micro) for mb in split_micro(items, micro, grouped)]
        policy, reference, _ = _load_pair(path, args.device)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        acc: dict[str, float] = {}

        def seq(p, y):
            ids = list(p) + list(y)
            return TokenizedSequence(input_ids=ids, attention_mask=[1] * len(ids),
                                     response_mask=[False] * len(p) + [True] * len(y),
                                     prompt_len=len(p), response_len=len(y))

        for it in range(steps + 3):
            if it == 3:
                acc.clear()
            mb = data[it % len(data)]
            c = time.process_time()

            def tick(key):
                nonlocal c
                now = time.process_time()
                acc[key] = acc.get(key, 0.0) + now - c
                c = now

            batch = collate_preference_pairs([TokenizedPair(chosen=seq(p, a), rejected=seq(p, b)) for p, a, b in mb],
                                             tok.pad_token_id)
            cat = concat_preference_batch(batch, tok.pad_token_id)
            ids, am, rm = cat["input_ids"], cat["attention_mask"], cat["response_mask"]
            tick("collate")
            pl = policy(input_ids=ids, attention_mask=am).logits
            tick("policy forward")
            with torch.no_grad():
                rl = reference(input_ids=ids, attention_mask=am).logits
            tick("reference forward")
            lp, lr = sequence_logprobs(pl, ids, rm), sequence_logprobs(rl, ids, rm)
            tick("sequence log-probs (x2)")
            extrapolated_sequence_logprobs(pl.detach(), rl, ids, rm, 0.5)
            tick("extrapolated log-probs (noise detection)")
            n = len(mb)
            loss = -torch.nn.functional.logsigmoid(0.1 * ((lp[:n] - lr[:n]) - (lp[n:] - lr[n:]))).mean()
            tick("loss")
            loss.backward()
            tick("backward")
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            tick("clip")
            opt.step()
            opt.zero_grad(set_to_none=True)
            tick("AdamW step")
        total = sum(acc.values())
        for key, v in acc.items():
            rows.append({"micro_batch": micro, "grouped_by_length": grouped, "component": key,
                         "cpu_ms_per_micro_batch": 1e3 * v / steps, "share": v / total})
    return rows


# ------------------------------------------------------------------------------ memory
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def memory_child(args) -> None:
    """One side in this (fresh) process: peak memory of one step above what is resident."""
    import torch

    bc.set_threads(args.threads)
    from spa_ray.models.loading import load_tokenizer

    path = bc.model_path(args)
    tok = load_tokenizer(path, require_chat_template=False)
    data = global_batches(bc.embedded_gold_pairs(tok, args.global_batch * 3), args.global_batch)
    step = make_side(args.memory_side, path, tok, data, args.device, args.batch)
    step()
    step()  # AdamW state and any lazy buffers exist from here on
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        print(json.dumps({"step_peak_mb": peak / 2**20, "resident_mb": base / 2**20}))
        return
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    step()
    hwm = _rss_kb("VmHWM")
    print(json.dumps({"step_peak_mb": (hwm - before) / 1024, "resident_mb": before / 1024}))


def measure_memory(args, sides, reps: int = 2) -> dict[str, list[float]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):  # set here for the ZeRO side
        env.pop(key, None)
    out: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(reps):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            cmd = [sys.executable, __file__, "--memory-side", side, "--batch", str(args.batch),
                   "--global-batch", str(args.global_batch),
                   "--device", args.device, "--threads", str(args.threads)]
            if args.toy:
                cmd.append("--toy")
            if args.model:
                cmd += ["--model", str(args.model)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if res.returncode != 0:
                bc.log(f"memory run of {side} failed (rc {res.returncode}):\n{res.stderr[-3000:]}\n{res.stdout[-500:]}")
                continue
            out[side].append(json.loads(res.stdout.strip().splitlines()[-1])["step_peak_mb"])
    return out


# -------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.common_args(ap, default_reps=9)
    bc.add_model_arg(ap)
    ap.add_argument("--global-batch", type=int, default=32, help="pairs per optimizer step (training.global_batch_size)")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[8, 32],
                    help="pairs per forward (training.micro_batch_size); one table block each")
    ap.add_argument("--deepspeed", action=argparse.BooleanOptionalAction, default=True,
                    help="also time our step through a DeepSpeed ZeRO-2 engine (the worker's path)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=None, help="time only these sides (and trl_dpo)")
    ap.add_argument("--breakdown", action="store_true",
                    help="only print the CPU-time breakdown of our step per component (the profile)")
    ap.add_argument("--memory-side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_side:
        memory_child(args)
        return 0

    threads = bc.set_threads(args.threads)
    from spa_ray.models.loading import load_tokenizer

    path = bc.model_path(args)
    tok = load_tokenizer(path, require_chat_template=False)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    peak = bc.matmul_peak_flops(threads, args.device)
    info = bc.header("train_step", threads, args.device, {
        "model": f"{path} ({config.hidden_size}h x {config.num_hidden_layers}L, vocab {config.vocab_size})",
        "matmul_peak_GFLOP_per_cpu_s": round(peak / 1e9, 2),
        "global_batch_pairs": args.global_batch,
        "timing": "CPU seconds of the process per optimizer step (wall seconds in the CSV); 1 step = global batch",
    })
    if args.breakdown:
        rows = [r for m in args.micro_batches for r in breakdown(args, path, tok, m, steps=3 if args.toy else 12)]
        info["loadavg_end"] = bc.loadavg()
        bc.print_table("Our refined step, CPU time per component (one micro-batch)", info, rows,
                       ["micro_batch", "grouped_by_length", "component", "cpu_ms_per_micro_batch", "share"])
        bc.write_csv(args.out or bc.DEFAULT_OUT / "train_step_breakdown.csv", info, rows)
        return 0
    import trl

    info["trl"] = trl.__version__
    sides = ["spa_refined", "trl_dpo", "spa_refined_ungrouped", "spa_dpo"] + (["spa_refined_zero2", "spa_refined_zero0"] if args.deepspeed else [])
    if args.sides:  # a subset (trl_dpo is always kept: every ratio is against it)
        sides = [s for s in sides if s in args.sides or s == "trl_dpo"]
    rows = []
    reps = 2 if args.toy and args.reps > 2 else args.reps
    G = args.global_batch
    for micro in args.micro_batches:
        if G % micro:
            raise SystemExit(f"--micro-batches {micro} must divide --global-batch {G}")
        data = global_batches(bc.embedded_gold_pairs(tok, G * (2 if args.toy else 8)), G)
        bc.log(f"micro={micro}: building sides {sides}")
        steps = {s: make_side(s, path, tok, data, args.device, micro) for s in sides}
        bc.log(f"micro={micro}: timing {reps} interleaved rounds")
        wall = bc.interleaved(steps, reps=reps, warmup=1, device=args.device)
        cpu = dict(bc.LAST_CPU_TIMES) if args.device == "cpu" else wall
        del steps
        mem = {} if args.no_memory else measure_memory(
            argparse.Namespace(**{**vars(args), "batch": micro}), sides, reps=1)
        flops = pair_flops(config, data)
        padded = {g: padding_share(data, micro, g) for g in (True, False)}
        base = bc.med(cpu["trl_dpo"])
        for s in sides:
            t = cpu[s]
            achieved = flops * G / bc.med(t)
            rows.append({
                "micro_batch": micro, "side": s, "threads": threads,
                "padding_share": padded[s not in ("trl_dpo", "spa_refined_ungrouped")],
                "step_cpu_ms": 1e3 * bc.med(t), "step_cpu_ms_range": bc.spread([1e3 * x for x in t]),
                "pairs_per_cpu_s": G / bc.med(t), "pairs_per_cpu_s_range": bc.spread([G / x for x in t]),
                "speed_vs_trl": base / bc.med(t),
                "step_wall_ms": 1e3 * bc.med(wall[s]), "step_wall_ms_range": bc.spread([1e3 * x for x in wall[s]]),
                "GFLOP_per_pair": flops / 1e9, "achieved_GFLOP_per_cpu_s": achieved / 1e9,
                "achieved_over_peak": achieved / peak,
                "step_peak_MB": bc.med(mem[s]) if mem.get(s) else math.nan,
            })
    info["loadavg_end"] = bc.loadavg()
    cols = ["micro_batch", "side", "threads", "padding_share", "step_cpu_ms", "step_cpu_ms_range", "pairs_per_cpu_s",
            "speed_vs_trl", "step_wall_ms", "achieved_GFLOP_per_cpu_s", "achieved_over_peak", "step_peak_MB"]
    bc.print_table("Training step: SPA refined DPO vs TRL DPOTrainer (equal batch, same pairs)", info, rows, cols)
    bc.write_csv(args.out or bc.DEFAULT_OUT / ("train_step_toy.csv" if args.toy else "train_step.csv"), info, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
