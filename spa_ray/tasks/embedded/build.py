"""Build (or reuse) the embedded world's tiny model: tokenizer, pretraining, SFT.

``build_embedded_model(cache_dir=None, ...) -> Path`` returns the folder of the SFT model
(pi_init). The cache entry ``<root>/<key>/`` holds
- ``sft/``:        model + tokenizer (``save_pretrained``, safetensors) -- pi_init
- ``pretrained/``: the pretrained-only model + tokenizer
- ``build.json``:  configs, timings, losses and probe metrics.
``<root>`` is ``cache_dir``, else ``$SPA_RAY_CACHE/embedded``, else
``~/.cache/spa-ray/embedded``; ``<key>`` hashes the world, model and training configs
and ``BUILD_VERSION``. A build writes to a temporary folder and renames it into place
when complete (a killed build is never taken as done); a file lock makes concurrent
builders wait for the first one instead of building twice.

Consumers load the result only through ``from_pretrained`` (AutoTokenizer /
AutoModelForCausalLM), exactly as for a hub id or any local checkpoint.

CLI: ``python -m spa_ray.tasks.embedded.build [--cache-dir D] [--force] [--tiny]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ModelSpec",
    "TrainSpec",
    "BuildSpec",
    "TINY_BUILD",
    "build_embedded_model",
    "build_tokenizer",
    "cache_root",
    "CHAT_TEMPLATE",
    "main",
]

BUILD_VERSION = "5"

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]

# Plain jinja; renders "<s><|user|> PROMPT <|assistant|>" (+ " RESPONSE </s>" for assistant turns).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} {{ eos_token }}"
    "{% else %}{{ message['content'] }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """Llama architecture of the tiny model."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class TrainSpec:
    """Sizes and optimiser settings of pretraining and SFT."""

    pretrain_docs: int = 40_000
    pretrain_seq_len: int = 64
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    sft_demos: int = 10_000
    sft_epochs: int = 1
    sft_batch: int = 16
    sft_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class BuildSpec:
    world_seed: int = 0
    per_category: int = 24
    quality: tuple = ()  # sorted (name, prob) overrides of DemoQuality
    families: tuple = ()  # prompt families; () = the world's DEFAULT_FAMILIES
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def key(self) -> str:
        """Cache key: the spec with the world's resolved settings and the source that makes
        the data, so changing a default in world.py or build.py can never reuse a stale build."""
        from .world import DEFAULT_FAMILIES, DemoQuality

        here = Path(__file__).resolve().parent
        source = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("world.py", "build.py"))).hexdigest()
        blob = json.dumps(
            {
                "v": BUILD_VERSION,
                **dataclasses.asdict(self),
                "resolved_quality": DemoQuality(**dict(self.quality)).as_dict(),
                "resolved_families": list(self.families or DEFAULT_FAMILIES),
                "source": source,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: seconds-scale build for tests: same code path, toy sizes
TINY_BUILD = BuildSpec(
    model=ModelSpec(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    train=TrainSpec(pretrain_docs=600, sft_demos=300, pretrain_batch=16, sft_batch=16),
)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SPA_RAY_CACHE")
    if env:
        return Path(env) / "embedded"
    return Path.home() / ".cache" / "spa-ray" / "embedded"


# ---------------------------------------------------------------------- tokenizer
def build_tokenizer(texts, extra_words=()):
    """A word-level tokenizer trained with `tokenizers` on ``texts``, as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)

    def it():
        yield from texts
        if extra_words:
            yield " ".join(extra_words)

    tok.train_from_iterator(it(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1024,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def response_ids(tokenizer, response: str) -> list[int]:
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


# ---------------------------------------------------------------------- training
def _lr_lambda(total: int, warmup_fraction: float):
    warm = max(1, int(total * warmup_fraction))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f


def _train(model, batches, lr: float, spec: TrainSpec, log, tag: str) -> list[float]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(len(batches), spec.warmup_fraction))
    model.train()
    losses = []
    t0 = time.time()
    for step, (ids, mask, labels) in enumerate(batches):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if (step + 1) % max(1, len(batches) // 10) == 0 or step + 1 == len(batches):
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"  {tag} step {step + 1}/{len(batches)} loss {recent:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return losses


def _pretrain_batches(tokenizer, docs, spec: TrainSpec, rng: random.Random):
    import torch

    stream: list[int] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for d in docs:
        stream += [bos] + tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
    L = spec.pretrain_seq_len
    n_chunks = len(stream) // L
    chunks = torch.tensor(stream[: n_chunks * L], dtype=torch.long).view(n_chunks, L)
    order = list(range(n_chunks))
    rng.shuffle(order)
    batches = []
    for i in range(0, n_chunks - spec.pretrain_batch + 1, spec.pretrain_batch):
        ids = chunks[order[i : i + spec.pretrain_batch]]
        batches.append((ids, torch.ones_like(ids), ids.clone()))
    return batches, len(stream)


def _sft_batches(tokenizer, demos, spec: TrainSpec, rng: random.Random):
    import torch

    rows = []
    for d in demos:
        p, r = prompt_ids(tokenizer, d.prompt), response_ids(tokenizer, d.response)
        rows.append((p + r, [-100] * len(p) + r))
    batches = []
    n_tokens = 0
    for _ in range(spec.sft_epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        # length-sorted within blocks of 50 batches, so padding stays small but order stays random
        block = spec.sft_batch * 50
        for b0 in range(0, len(order), block):
            blk = sorted(order[b0 : b0 + block], key=lambda i: len(rows[i][0]))
            group = [blk[i : i + spec.sft_batch] for i in range(0, len(blk), spec.sft_batch)]
            rng.shuffle(group)
            for g in group:
                T = max(len(rows[i][0]) for i in g)
                ids = torch.full((len(g), T), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(g), T), dtype=torch.long)
                labels = torch.full((len(g), T), -100, dtype=torch.long)
                for k, i in enumerate(g):
                    x, y = rows[i]
                    ids[k, : len(x)] = torch.tensor(x)
                    mask[k, : len(x)] = 1
                    labels[k, : len(y)] = torch.tensor(y)
                n_tokens += int(mask.sum())
                batches.append((ids, mask, labels))
    return batches, n_tokens


def _probe_knowledge(model, tokenizer, world, n: int = 120) -> dict:
    """Does the pretrained model know the facts? (greedy next token over the candidates)."""
    import torch

    from .world import CATEGORIES, COLOURS

    kb = world.kb
    ents = kb.entities[:: max(1, len(kb.entities) // n)][:n]
    col_ids = [tokenizer.convert_tokens_to_ids(c) for c in COLOURS]
    cat_ids = [tokenizer.convert_tokens_to_ids(c) for c in CATEGORIES]

    def acc(template, cand_ids, cands, truth):
        texts = [template.format(e=e) for e in ents]
        enc = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        T = max(map(len, enc))
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (T - len(x)) for x in enc])
        mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in enc])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        last = torch.tensor([len(x) - 1 for x in enc])
        sub = logits[torch.arange(len(enc)), last][:, cand_ids]
        pred = [cands[i] for i in sub.argmax(-1).tolist()]
        return sum(p == truth(e) for p, e in zip(pred, ents)) / len(ents)

    return {
        "fact_colour_accuracy": acc("the colour of {e} is", col_ids, COLOURS, kb.colour),
        "membership_accuracy": acc("{e} is one of the", cat_ids, CATEGORIES, lambda e: kb.category[e]),
    }


def _sft_probe(model, tokenizer, task, n: int = 200, seed: int = 123) -> dict:
    """Mean gold score of temperature-0.7 samples on ``n`` random prompts (a sanity number)."""
    import torch

    rng = random.Random(seed)
    prompts = rng.sample(task.all_prompts(), n)
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    scores, lengths = [], []
    for i in range(0, n, 50):
        chunk = prompts[i : i + 50]
        enc = [prompt_ids(tokenizer, p) for p in chunk]
        T = max(map(len, enc))
        ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(x)) + x for x in enc])
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in enc])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0,
                                 max_new_tokens=32, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        for p, row in zip(chunk, out[:, T:]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            scores.append(task.score(p, text))
            lengths.append(len(text.split()))
    perfect = sum(s >= (6 if task.world.spec(p).is_list else 5) for s, p in zip(scores, prompts)) / n
    return {"sample_mean_gold": sum(scores) / n, "sample_perfect_rate": perfect,
            "sample_mean_words": sum(lengths) / n}


def default_threads() -> int:
    """Torch threads for the build: ``$SPA_RAY_THREADS``, else 1.

    One thread is the robust choice on a shared 2-core machine: with other processes
    busy, two OpenMP threads spin at every barrier and ran 4x SLOWER than one (measured).
    """
    return int(os.environ.get("SPA_RAY_THREADS", "1"))


def _build_into(out: Path, spec: BuildSpec, task, log, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.train.seed)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build_steps(out, spec, task, log, threads)
    finally:
        torch.set_num_threads(prev_threads)


def _build_steps(out: Path, spec: BuildSpec, task, log, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(spec.train.seed)
    timings = {}
    t0 = time.time()
    docs = list(task.pretraining_corpus(spec.train.pretrain_docs, seed=spec.train.seed))
    demos = task.sft_demonstrations(spec.train.sft_demos, seed=spec.train.seed)
    world_words = sorted({w for p in task.all_prompts() for w in p.split()} | set(task.world.kb.entities))
    tokenizer = build_tokenizer(docs + [d.prompt + " " + d.response for d in demos], extra_words=world_words)
    timings["data_and_tokenizer_s"] = time.time() - t0
    log(f"tokenizer: {len(tokenizer)} tokens, {len(docs)} docs, {len(demos)} demos ({timings['data_and_tokenizer_s']:.1f}s)")

    m = spec.model
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: LlamaForCausalLM {n_params / 1e6:.2f}M parameters")

    t1 = time.time()
    batches, n_tok = _pretrain_batches(tokenizer, docs, spec.train, rng)
    pre_losses = _train(model, batches, spec.train.pretrain_lr, spec.train, log, "pretrain")
    timings["pretrain_s"] = time.time() - t1
    probe_pre = _probe_knowledge(model, tokenizer, task.world)
    log(f"pretrain: {n_tok} tokens in {timings['pretrain_s']:.0f}s; probe {probe_pre}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out / "pretrained", safe_serialization=True)
    tokenizer.save_pretrained(out / "pretrained")

    t2 = time.time()
    batches, n_tok_sft = _sft_batches(tokenizer, demos, spec.train, rng)
    sft_losses = _train(model, batches, spec.train.sft_lr, spec.train, log, "sft")
    timings["sft_s"] = time.time() - t2
    model.save_pretrained(out / "sft", safe_serialization=True)
    tokenizer.save_pretrained(out / "sft")
    probe_sft = _sft_probe(model, tokenizer, task)
    log(f"sft: {n_tok_sft} tokens in {timings['sft_s']:.0f}s; probe {probe_sft}")
    timings["total_s"] = time.time() - t0

    def tail(xs):
        return sum(xs[-50:]) / max(1, len(xs[-50:]))

    return {
        "key": spec.key(),
        "spec": dataclasses.asdict(spec),
        "task": task.describe(),
        "n_parameters": n_params,
        "vocab_size": len(tokenizer),
        "pretrain_tokens": n_tok,
        "sft_tokens": n_tok_sft,
        "pretrain_final_loss": tail(pre_losses),
        "sft_final_loss": tail(sft_losses),
        "probe_pretrained": probe_pre,
        "probe_sft": probe_sft,
        "timings": timings,
        "torch_threads": threads,
    }


def build_embedded_model(
    cache_dir: str | os.PathLike | None = None,
    spec: BuildSpec | None = None,
    task=None,
    force: bool = False,
    log=None,
    which: str = "sft",
    threads: int | None = None,
) -> Path:
    """Folder of the embedded SFT model (``which="pretrained"`` for the pretrained-only one).

    Builds it on first use (a few minutes on 2 cores), then returns the cached folder.
    ``task`` defaults to ``EmbeddedTask`` with the spec's world settings.
    """
    from .task import EmbeddedTask
    from .world import DEFAULT_FAMILIES, DemoQuality

    spec = spec or BuildSpec()
    if which not in ("sft", "pretrained"):
        raise ValueError(f"which must be 'sft' or 'pretrained', got {which!r}")
    if task is None:
        task = EmbeddedTask(world_seed=spec.world_seed, per_category=spec.per_category, quality=dict(spec.quality),
                            families=spec.families or None)
    else:  # the task's world decides the world part of the spec (and so the cache key)
        default_quality = DemoQuality().as_dict()
        overrides = tuple(sorted((k, v) for k, v in task.world.quality.as_dict().items() if v != default_quality[k]))
        spec = dataclasses.replace(spec, world_seed=task.world_seed, per_category=task.world.per_category,
                                   quality=overrides,
                                   families=() if task.world.families == DEFAULT_FAMILIES else task.world.families)
    log = log or (lambda msg: print(f"[spa-ray embedded] {msg}", file=sys.stderr, flush=True))
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.key()
    if (final / "build.json").exists() and not force:
        return final / which
    with open(root / f"{spec.key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds the result
        try:
            if (final / "build.json").exists() and not force:
                return final / which
            tmp = root / f".tmp-{spec.key()}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            log(f"building the embedded model into {final} (key {spec.key()})")
            info = _build_into(tmp, spec, task, log, threads or default_threads())
            (tmp / "build.json").write_text(json.dumps(info, indent=2))
            if final.exists():  # forced rebuild, or a stale incomplete folder
                shutil.rmtree(final)
            os.rename(tmp, final)
            log(f"done in {info['timings']['total_s']:.0f}s: {final}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final / which


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--tiny", action="store_true", help="the seconds-scale test build")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default $SPA_RAY_THREADS or 1)")
    args = ap.parse_args(argv)
    spec = TINY_BUILD if args.tiny else BuildSpec()
    path = build_embedded_model(args.cache_dir, spec=spec, force=args.force, threads=args.threads)
    info = json.loads((path.parent / "build.json").read_text())
    print(json.dumps({"path": str(path), "timings": info["timings"], "n_parameters": info["n_parameters"],
                      "probe_pretrained": info["probe_pretrained"], "probe_sft": info["probe_sft"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
