"""The swapped judges' models: train once, save as a from_pretrained folder, load, score.

This is the one module of ``spa_ray.judging`` that touches files and trains models
(torch + transformers, no Ray): the math lives in ``reward_model`` and ``llm_judge``;
``actors.model_judge`` is the Ray shell; ``pipeline.stages.prepare_judge_model`` decides
the data and where the folder lives (the run directory, one per data seed).

Two kinds (``judge.kind`` in the config):

- ``reward_model``: ``*ForSequenceClassification(num_labels=1)`` initialised from pi_init
  (a fresh linear head), trained by Bradley-Terry on gold pairs. Stand-in for PairRM.
- ``llm_as_judge``: pi_init fine-tuned on the seed pairs written as the (A)/(B) question
  (``llm_judge.judge_sft_examples``), cross-entropy on the answer token only. When the
  tokenizer has no single token for "(A)" and "(B)" that differ (the embedded world's
  word-level vocabulary maps both to <unk>), the two answers are added as tokens and the
  embeddings resized (ours: a real tokenizer spells them in several pieces; the log-prob
  of the first differing piece is not the same quantity).

Defaults that are ours, not the paper's (its judge is a 7B SFT model, 3 epochs, lr 2e-5,
batch 32): the learning rates below suit the embedded tiny model; the paper's 2e-5 does
not move it (see the config's help strings).

Every saved folder holds ``judge.json`` (kind, answer token ids, training record).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spa_ray.data.tokenize import encode_prompt, encode_response
from spa_ray.judging.implicit_reward import label_pairs
from spa_ray.judging.llm_judge import ANSWER_A, ANSWER_B, judge_prompt, judge_sft_examples, option_logprobs, two_order_rewards
from spa_ray.judging.reward_model import bradley_terry_loss, scalar_rewards

__all__ = [
    "JUDGE_KINDS",
    "JudgeTrainSpec",
    "ModelJudge",
    "judge_rows",
    "load_model_judge",
    "train_judge_model",
    "train_llm_judge",
    "train_reward_model",
]

JUDGE_KINDS = ("reward_model", "llm_as_judge")
JUDGE_INFO = "judge.json"


@dataclass
class JudgeTrainSpec:
    epochs: int = 1
    learning_rate: float = 5e-4
    batch_size: int = 32
    warmup_ratio: float = 0.1
    seed: int = 0
    max_length: int | None = None  # None: the model's max_position_embeddings (else 2048)
    dtype: str = "auto"
    device: str = "cpu"


def _log(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def _max_length(model, spec: JudgeTrainSpec) -> int:
    if spec.max_length:
        return int(spec.max_length)
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def _fit(prompt_ids: list[int], response_ids: list[int], max_len: int) -> list[int]:
    """prompt + response within max_len: the response is cut from the right, then the prompt from the left."""
    ids = list(prompt_ids) + list(response_ids)
    if len(ids) <= max_len:
        return ids
    room = max_len - len(prompt_ids)
    if room >= 1:
        return list(prompt_ids) + list(response_ids)[:room]
    return list(prompt_ids)[-(max_len - 1):] + list(response_ids)[:1]


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        am[b, : len(s)] = 1
    return ids.to(device), am.to(device)


def _scheduler(optimizer, total: int, warmup_ratio: float):
    warm = max(1, int(warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(n: int, batch_size: int, epochs: int, seed: int):
    rng = random.Random(seed)
    for epoch in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch_size):
            yield epoch, order[i : i + batch_size]


def _train_loop(model, n_examples: int, spec: JudgeTrainSpec, step_loss, name: str, log) -> dict:
    """The judges' shared loop: AdamW + warm-up/cosine, clipping, shuffled batches per
    epoch. ``step_loss(idx) -> (loss, accuracy)`` is one batch's loss and its accuracy."""
    total = math.ceil(n_examples / spec.batch_size) * spec.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    sched = _scheduler(opt, total, spec.warmup_ratio)
    model.train()
    t0, losses, accs = time.time(), [], []
    for step, (_, idx) in enumerate(_batches(n_examples, spec.batch_size, spec.epochs, spec.seed)):
        loss, accuracy = step_loss(idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        accs.append(accuracy)
        if (step + 1) % max(1, total // 5) == 0 or step + 1 == total:
            k = max(1, min(20, len(losses)))
            _log(log, f"{name} step {step + 1}/{total} loss {sum(losses[-k:]) / k:.3f} acc {sum(accs[-k:]) / k:.2f}")
    model.eval()
    k = max(1, min(20, len(losses)))
    return {"steps": total, "seconds": time.time() - t0, "final_loss": sum(losses[-k:]) / k,
            "final_train_accuracy": sum(accs[-k:]) / k}


def _tokenizer(path):
    from spa_ray.models.loading import load_tokenizer

    return load_tokenizer(path, require_chat_template=True)


def _save(model, tok, out_dir: Path, info: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    (out_dir / JUDGE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")


# ------------------------------------------------------------------ reward model
def train_reward_model(base_path, pairs: Sequence, out_dir, spec: JudgeTrainSpec | None = None, log=None) -> dict:
    """Bradley-Terry scalar-head scorer from ``base_path`` on gold ``pairs`` (prompt/chosen/rejected)."""
    from transformers import AutoModelForSequenceClassification

    from spa_ray.models.loading import resolve_dtype

    spec = spec or JudgeTrainSpec()
    if not pairs:
        raise ValueError("train_reward_model: no gold pairs to train on")
    torch.manual_seed(spec.seed)
    tok = _tokenizer(base_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        os.fspath(base_path), num_labels=1, dtype=resolve_dtype(spec.dtype), use_safetensors=True
    ).to(spec.device)
    model.config.pad_token_id = tok.pad_token_id
    max_len = _max_length(model, spec)
    enc = []
    for p in pairs:
        prompt = encode_prompt(tok, p.prompt)
        enc.append((_fit(prompt, encode_response(tok, p.chosen), max_len), _fit(prompt, encode_response(tok, p.rejected), max_len)))
    def step_loss(idx):
        seqs = [enc[i][0] for i in idx] + [enc[i][1] for i in idx]
        ids, am = _right_pad(seqs, tok.pad_token_id, spec.device)
        r = scalar_rewards(model, ids, am)
        n = len(idx)
        return bradley_terry_loss(r[:n], r[n:]).mean(), float((r[:n] > r[n:]).float().mean())

    trained = _train_loop(model, len(enc), spec, step_loss, "reward model", log)
    info = {
        "kind": "reward_model", "base": os.fspath(base_path), "pairs": len(enc), **trained,
        "max_length": max_len, "spec": asdict(spec),
    }
    _save(model, tok, Path(out_dir), info)
    return info


# ------------------------------------------------------------------ LLM-as-judge
def _answer_ids(tok, model=None) -> tuple[int, int, bool]:
    """Single-token ids of "(A)" and "(B)"; adds them as tokens (and resizes `model`) if needed."""
    def single(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 and ids[0] != tok.unk_token_id else None

    a, b = single(ANSWER_A), single(ANSWER_B)
    if a is not None and b is not None and a != b:
        return a, b, False
    if model is None:
        raise ValueError(f"the judge tokenizer has no single tokens for {ANSWER_A!r} and {ANSWER_B!r}")
    tok.add_tokens([ANSWER_A, ANSWER_B])
    model.resize_token_embeddings(len(tok))
    a, b = single(ANSWER_A), single(ANSWER_B)
    if a is None or b is None or a == b:
        raise ValueError(f"could not give {ANSWER_A!r}/{ANSWER_B!r} their own tokens")
    return a, b, True


def _question_ids(tok, prompt: str, first: str, second: str, max_len: int) -> list[int]:
    """Token ids of the judge's question (chat template, generation prompt); the two
    responses are cut evenly (by tokens, from the right) when the question is too long."""
    ids = encode_prompt(tok, judge_prompt(prompt, first, second))
    if len(ids) <= max_len:
        return ids
    r1 = tok(first, add_special_tokens=False)["input_ids"]
    r2 = tok(second, add_special_tokens=False)["input_ids"]
    over = len(ids) - max_len
    keep1 = max(1, len(r1) - (over + 1) // 2)
    keep2 = max(1, len(r2) - over // 2)
    ids = encode_prompt(tok, judge_prompt(prompt, tok.decode(r1[:keep1]), tok.decode(r2[:keep2])))
    return ids[-max_len:]


def _next_token_logits(model, seqs: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    ids, am = _right_pad(seqs, pad_id, device)
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    last = am.sum(dim=1) - 1
    return logits[torch.arange(len(seqs), device=logits.device), last]


def train_llm_judge(base_path, pairs: Sequence, out_dir, spec: JudgeTrainSpec | None = None, log=None) -> dict:
    """pi_init fine-tuned on ``pairs`` as (A)/(B) questions, both orders, loss on the answer token."""
    from spa_ray.models.loading import load_causal_lm

    spec = spec or JudgeTrainSpec(epochs=3)
    if not pairs:
        raise ValueError("train_llm_judge: no gold pairs to train on")
    torch.manual_seed(spec.seed)
    tok = _tokenizer(base_path)
    model = load_causal_lm(base_path, dtype=spec.dtype, device=spec.device)
    id_a, id_b, added = _answer_ids(tok, model)
    max_len = _max_length(model, spec) - 1
    examples = judge_sft_examples(pairs)
    enc = []
    for p, (question, answer) in zip([p for p in pairs for _ in range(2)], examples):
        first, second = (p.chosen, p.rejected) if answer == ANSWER_A else (p.rejected, p.chosen)
        enc.append((_question_ids(tok, p.prompt, first, second, max_len), id_a if answer == ANSWER_A else id_b))
    def step_loss(idx):
        logits = _next_token_logits(model, [enc[i][0] for i in idx], tok.pad_token_id, spec.device)
        target = torch.tensor([enc[i][1] for i in idx], device=logits.device)
        with torch.no_grad():
            la, lb = option_logprobs(logits.detach(), id_a, id_b)
            accuracy = float(((la > lb) == (target == id_a)).float().mean())
        return torch.nn.functional.cross_entropy(logits.float(), target), accuracy

    trained = _train_loop(model, len(enc), spec, step_loss, "LLM judge", log)
    info = {
        "kind": "llm_as_judge", "base": os.fspath(base_path), "pairs": len(pairs), "examples": len(enc), **trained,
        "answer_ids": [id_a, id_b], "answers_added": added, "max_length": max_len, "spec": asdict(spec),
    }
    _save(model, tok, Path(out_dir), info)
    return info


def train_judge_model(kind: str, base_path, pairs: Sequence, out_dir, spec: JudgeTrainSpec | None = None, log=None) -> dict:
    if kind == "reward_model":
        return train_reward_model(base_path, pairs, out_dir, spec, log)
    if kind == "llm_as_judge":
        return train_llm_judge(base_path, pairs, out_dir, spec, log)
    raise ValueError(f"kind must be one of {JUDGE_KINDS}, got {kind!r}")


# ------------------------------------------------------------------ judging
class ModelJudge:
    """A trained judge folder, loaded: ``rewards(prompts, first, second) -> (r1, r2)`` [N] float64."""

    def __init__(self, path, device: str = "cpu", dtype: str = "auto", batch_size: int = 64):
        from spa_ray.models.loading import resolve_dtype

        self.path = os.fspath(path)
        self.info = json.loads((Path(path) / JUDGE_INFO).read_text(encoding="utf-8"))
        self.kind = self.info["kind"]
        if self.kind not in JUDGE_KINDS:
            raise ValueError(f"{path}/{JUDGE_INFO}: unknown judge kind {self.kind!r}")
        self.device, self.batch_size = device, int(batch_size)
        self.tok = _tokenizer(path)
        if self.kind == "reward_model":
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.path, dtype=resolve_dtype(dtype), use_safetensors=True
            ).to(device)
        else:
            from spa_ray.models.loading import load_causal_lm

            self.model = load_causal_lm(self.path, dtype=dtype, device=device)
            self.id_a, self.id_b = (int(i) for i in self.info["answer_ids"])
        self.model.eval()
        self.max_length = int(self.info["max_length"])

    def _batched(self, seqs: list[list[int]], fn) -> torch.Tensor:
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[torch.Tensor | None] = [None] * len(seqs)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            vals = fn([seqs[i] for i in idx])
            for i, v in zip(idx, vals):
                out[i] = v
        return torch.stack(out) if out else torch.zeros(0)

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Reward model only: r(x, y) [N] float64."""
        if self.kind != "reward_model":
            raise ValueError("scores() is for reward models; an LLM judge only compares two responses")
        seqs = [_fit(encode_prompt(self.tok, p), encode_response(self.tok, r), self.max_length) for p, r in zip(prompts, responses)]

        def fn(batch):
            ids, am = _right_pad(batch, self.tok.pad_token_id, self.device)
            return scalar_rewards(self.model, ids, am).double().cpu()

        return self._batched(seqs, fn)

    @torch.no_grad()
    def option_logprobs(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]):
        """LLM judge only: log p("(A)"), log p("(B)") with (A) = first, (B) = second."""
        seqs = [_question_ids(self.tok, p, a, b, self.max_length) for p, a, b in zip(prompts, first, second)]

        def fn(batch):
            logits = _next_token_logits(self.model, batch, self.tok.pad_token_id, self.device)
            la, lb = option_logprobs(logits, self.id_a, self.id_b)
            return torch.stack([la, lb], dim=1).cpu()

        both = self._batched(seqs, fn)
        return both[:, 0], both[:, 1]

    @torch.no_grad()
    def rewards(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]):
        if not (len(prompts) == len(first) == len(second)):
            raise ValueError(f"{len(prompts)} prompts, {len(first)} first and {len(second)} second responses")
        n = len(prompts)
        if n == 0:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        if self.kind == "reward_model":
            r = self.scores(list(prompts) * 2, list(first) + list(second))
            return r[:n], r[n:]
        la, lb = self.option_logprobs(prompts, first, second)
        la_s, lb_s = self.option_logprobs(prompts, second, first)
        return two_order_rewards(la, lb, la_s, lb_s)


def load_model_judge(path, device: str = "cpu", dtype: str = "auto", batch_size: int = 64) -> ModelJudge:
    return ModelJudge(path, device=device, dtype=dtype, batch_size=batch_size)


def judge_rows(judge: ModelJudge, rows: Sequence[dict], version: int | None = None) -> list[dict]:
    """Label rows (prompt, response_1, response_2 as text) like the implicit-reward judge:
    reward_1/2, probability = sigma(r1 - r2), first_is_chosen, is_tie."""
    if not rows:
        return []
    r1, r2 = judge.rewards([r["prompt"] for r in rows], [r["response_1"] for r in rows], [r["response_2"] for r in rows])
    labels = label_pairs(r1, r2)
    return [
        {
            "reward_1": float(r1[i]), "reward_2": float(r2[i]), "probability": float(labels.probability[i]),
            "first_is_chosen": bool(labels.first_is_chosen[i]), "is_tie": bool(labels.is_tie[i]),
            "judge_kind": judge.kind, "judge_version": version,
        }
        for i in range(len(rows))
    ]
