"""Shared helpers of the benchmarks/bench_*.py scripts (no project logic lives here).

Every benchmark measures the two sides of a ratio in ONE run, on the same machine, model
and data, INTERLEAVED (A B A B ...), because the 2-core machine is shared and its load
changes minute to minute. It reports the median and the spread (min-max) of each side,
the ratio of the medians, the torch thread count and the load average before and after,
prints a markdown table and writes the same rows as CSV.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/spa-ray/torch_extensions"))

DEFAULT_OUT = ROOT / "runs" / "bench"
_LOAD_AT_START = "%.2f/%.2f/%.2f" % os.getloadavg()  # when the script started


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def set_threads(n: int) -> int:
    """Torch intra-op threads for this process (the project default on this machine is 1)."""
    import torch

    torch.set_num_threads(int(n))
    return torch.get_num_threads()


def loadavg() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f}/{b:.2f}/{c:.2f}"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


# --------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleaved(
    sides: dict[str, Callable[[], Any]], reps: int, warmup: int = 1, device: str = "cpu"
) -> dict[str, list[float]]:
    """Wall seconds of each side's call, run A B A B ... (`warmup` untimed rounds first).

    The order inside a round alternates (A B, B A, ...) so neither side always runs
    right after the other's allocations. CPU seconds of this process for the same calls
    are in ``LAST_CPU_TIMES`` (on a shared machine wall time mostly measures the
    scheduler; CPU time measures the work done, for single-process sides).
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            sides[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    LAST_CPU_TIMES.clear()
    LAST_CPU_TIMES.update(cpu)
    return times


LAST_CPU_TIMES: dict[str, list[float]] = {}


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def spread(xs: Sequence[float], scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    """'min-max' of scale/x (rates) when scale is given per item, as a string."""
    if not xs:
        return "-"
    return f"{fmt.format(min(xs))}-{fmt.format(max(xs))}"


def rates(times: Sequence[float], work: float) -> list[float]:
    return [work / t for t in times]


# ---------------------------------------------------------------------------- floors
def matmul_peak_flops(threads: int, device: str = "cpu", n: int = 512, seconds: float = 2.0,
                      dtype: str = "float32") -> float:
    """This machine's dense matmul rate, FLOP per CPU-second of this process (per second on
    CUDA), with the current torch threads: the median over repeated [n, n] x [n, n]
    products for about `seconds`. CPU time, not wall time, so that other users' load on a
    shared machine does not count as slowness (the same convention as the sides' figures).
    """
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    (a @ b).sum().item()
    clock = time.perf_counter if str(device).startswith("cuda") else time.process_time
    samples = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(samples) < 5:
        sync(device)
        t0 = clock()
        c = a @ b
        sync(device)
        samples.append(clock() - t0)
    del c
    return 2.0 * n**3 / max(statistics.median(samples), 1e-9)


def llama_forward_flops(config: Any, seq_len: int, scored_positions: int | None = None) -> float:
    """Forward FLOPs of one sequence of `seq_len` real tokens (matmuls only, 2 per MAC).

    Per token and layer: q/k/v/o projections, the gated MLP (3 matrices) and attention
    (QK^T and AV, causal: on average (seq_len+1)/2 keys per query). Plus the LM head on
    `scored_positions` positions (default all). Embedding lookups, norms and softmaxes
    are not counted (they are not matmuls). Padding is never counted: this is the
    useful work, so achieved/peak includes padding waste.
    """
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    ffn = config.intermediate_size
    layers = config.num_hidden_layers
    vocab = config.vocab_size
    proj = 2 * d * (heads * head_dim) * 2 + 2 * d * (kv * head_dim) * 2  # q, o + k, v
    mlp = 2 * 3 * d * ffn
    attn = 2 * 2 * heads * head_dim * (seq_len + 1) / 2
    per_token = layers * (proj + mlp + attn)
    head = 2 * d * vocab * (seq_len if scored_positions is None else scored_positions)
    return per_token * seq_len + head


# ---------------------------------------------------------------------------- output
def header(name: str, threads: int, device: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    info = {
        "benchmark": name,
        "machine": machine() if device == "cpu" else torch.cuda.get_device_name(0),
        "device": device,
        "torch_threads": threads,
        "torch": torch.__version__,
        "loadavg_start": _LOAD_AT_START,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    info.update(extra or {})
    return info


def print_table(title: str, info: dict[str, Any], rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = [f"## {title}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def write_csv(path: Path, info: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    keys += [k for k in info if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({**info, **row})
    log(f"wrote {path}")
    return path


def common_args(parser, default_reps: int = 7) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SPA_RAY_THREADS", "1")),
                        help="torch threads per process (project default on this machine: 1)")
    parser.add_argument("--reps", type=int, default=default_reps, help="timed rounds per side (interleaved)")
    parser.add_argument("--toy", action="store_true", help="tiny sizes: checks the script runs, figures meaningless")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default runs/bench/<name>.csv)")


# ------------------------------------------------------------------------ model and data
def model_path(args) -> str:
    """--model, else the embedded task's cached SFT model (the seconds-scale build with --toy)."""
    if getattr(args, "model", None):
        return str(args.model)
    from spa_ray.tasks.embedded.build import TINY_BUILD, BuildSpec, build_embedded_model

    return str(build_embedded_model(spec=TINY_BUILD if args.toy else BuildSpec(), log=lambda m: None))


def embedded_prompts(n: int, seed: int = 0, which: str = "iteration") -> list[str]:
    """The embedded task's first `n` iteration-1 (or seed) prompts for data seed `seed`."""
    from spa_ray.tasks.embedded import EmbeddedTask

    splits = EmbeddedTask().prompt_splits(seed=seed)
    pool = splits.iterations[0] if which == "iteration" else splits.seed
    return list(pool[:n])


def embedded_gold_pairs(tokenizer, n: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """`n` gold seed pairs of the embedded task as token ids (prompt, chosen, rejected),
    tokenised exactly as the driver does (``tokenize_gold_pairs``)."""
    from spa_ray.tasks.embedded import EmbeddedTask
    from spa_ray.training.pairs_table import tokenize_gold_pairs

    task = EmbeddedTask()
    prompts = task.prompt_splits(seed=seed).seed
    pairs = task.seed_pairs(prompts[: int(n * 1.2) + 8], seed=seed)[:n]
    cols = tokenize_gold_pairs(tokenizer, pairs, max_prompt_len=1024, max_total_len=2048)
    return list(zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"]))


def add_model_arg(parser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SFT model)")


def add_generation_args(parser) -> None:
    """The generation benchmarks' workload: embedded prompts, 2 samples each."""
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="transformers backend: prompts per generate call (generation.batch_size)")
    parser.add_argument("--max-new-tokens", type=int, default=300)


def ray_init(attempts: int = 6, **kwargs) -> None:
    """ray.init of a NEW local cluster (never one another process started here), retried:
    on an overloaded machine the raylet can miss Ray's fixed 30 s start window ("The
    current node timed out during startup")."""
    import contextlib

    import ray

    kwargs.setdefault("address", "local")
    for attempt in range(attempts):
        try:
            ray.init(**kwargs)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
            log(f"ray.init failed ({exc}); retrying")
            with contextlib.suppress(Exception):
                ray.shutdown()
            if attempt == attempts - 1:
                raise
