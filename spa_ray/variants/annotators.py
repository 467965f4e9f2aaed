"""SP2DPO annotators: (prompt, chosen, rejected) -> (category, magnitude, confidence).

The annotation fixes each pair's beta_i before training (``objectives.sp2dpo.sp2dpo_beta``).
Plug-ins, selected by ``variant.sp2dpo.annotator``:

- ``rule`` (:class:`QualityRuleAnnotator`): for tasks with per-quality gold components
  (``task.quality_scores(prompt, response) -> {quality: score}``, the embedded task). It
  reads which qualities differ between the two responses. OUR MAPPING (the paper's teacher
  prompt and mapping are unpublished): content/correct -> factuality, count/opening ->
  instruction_following, repetition -> helpfulness, ending -> style; the category is the
  quality with the largest gap (ties: the higher multiplier); magnitude
  m = clip(ceil(5*|score gap| / max score), 1, 5); confidence k = (gap in the chosen
  response's favour) / (sum of absolute per-quality gaps), so a pair whose components
  disagree with its label gets a low k. It reads the gold components, so it is an
  oracle-grade teacher: an upper bound for what an LLM teacher can give.
- ``teacher`` (:class:`TeacherLLMAnnotator`): a causal LM asked for a JSON annotation,
  run as a Ray task (``variant.sp2dpo.teacher_num_gpus``). Unparseable answers fall back
  to (helpfulness, 3, 0.5) and are counted. Unrun with a real teacher here (no GPU).
- ``pkg.mod:Class``: any class with ``annotate(prompts, chosen, rejected) -> list[Annotation]``,
  constructed with the task as its only argument.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from spa_ray.objectives.sp2dpo import CATEGORY_MULTIPLIERS, category_multiplier


@dataclass(frozen=True)
class Annotation:
    category: str
    magnitude: float   # 1..5
    confidence: float  # 0..1
    source: str = "rule"


FALLBACK = Annotation("helpfulness", 3.0, 0.5, "fallback")

QUALITY_CATEGORY = {
    "content": "factuality",
    "correct": "factuality",
    "count": "instruction_following",
    "opening": "instruction_following",
    "repetition": "helpfulness",
    "ending": "style",
}
QUALITY_MAX = {"opening": 1.0, "count": 1.0, "content": 2.0, "repetition": 1.0, "ending": 1.0, "correct": 3.0}


class QualityRuleAnnotator:
    """Rule-based annotator over a task's per-quality gold components (see module doc)."""

    def __init__(self, task: Any):
        if not callable(getattr(task, "quality_scores", None)):
            raise ValueError(
                f"variant.sp2dpo.annotator=rule needs a task with quality_scores(prompt, response); "
                f"task {getattr(task, 'name', type(task).__name__)!r} has none: use annotator=teacher"
            )
        self.task = task

    def annotate_one(self, prompt: str, chosen: str, rejected: str) -> Annotation:
        qc = self.task.quality_scores(prompt, chosen)
        qr = self.task.quality_scores(prompt, rejected)
        gaps = {q: float(qc.get(q, 0.0)) - float(qr.get(q, 0.0)) for q in set(qc) | set(qr)}
        differing = {q: g for q, g in gaps.items() if g != 0.0}
        if not differing:
            return Annotation("style", 1.0, 0.0)
        top = max(differing, key=lambda q: (abs(differing[q]), CATEGORY_MULTIPLIERS[QUALITY_CATEGORY.get(q, "helpfulness")]))
        category = QUALITY_CATEGORY.get(top, "helpfulness")
        max_total = sum(QUALITY_MAX.get(q, 1.0) for q in qc) or 1.0
        total_gap = abs(sum(gaps.values()))
        magnitude = float(min(5, max(1, math.ceil(5.0 * total_gap / max_total - 1e-9))))
        favour = sum(g for g in differing.values() if g > 0)
        confidence = favour / sum(abs(g) for g in differing.values())
        return Annotation(category, magnitude, float(confidence))

    def annotate(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> list[Annotation]:
        return [self.annotate_one(p, c, r) for p, c, r in zip(prompts, chosen, rejected)]


TEACHER_PROMPT = (
    "Two responses to the same instruction are given; Response A is preferred.\n"
    "Instruction: {prompt}\nResponse A: {chosen}\nResponse B: {rejected}\n"
    "In which category is A's advantage most important (one of: {categories}), how large is it "
    "(magnitude 1-5), and how confident are you that A is better (confidence 0-1)? "
    'Answer only with JSON like {{"category": "factuality", "magnitude": 3, "confidence": 0.8}}.\n'
)


def parse_teacher_answer(text: str) -> Annotation | None:
    """The first JSON object in ``text`` as an Annotation, or None when it is not one."""
    match = re.search(r"\{.*?\}", text, flags=re.S)
    if not match:
        return None
    try:
        obj = json.loads(match.group(0))
        category = str(obj["category"]).strip().lower().replace("-", "_").replace(" ", "_")
        category_multiplier(category)
        magnitude = float(obj["magnitude"])
        confidence = float(obj["confidence"])
    except (ValueError, KeyError, TypeError):
        return None
    if not (1 <= magnitude <= 5 and 0 <= confidence <= 1):
        return None
    return Annotation(category, magnitude, confidence, "teacher")


class TeacherLLMAnnotator:
    """A causal LM teacher; greedy JSON answer per pair, parsed, fallback when unparseable."""

    def __init__(self, model: str, *, max_new_tokens: int = 48, trust_remote_code: bool = False,
                 device: str | None = None):
        import torch

        from spa_ray.models.loading import load_causal_lm, load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code, require_chat_template=False)
        self.model = load_causal_lm(model, dtype="auto", device=self.device, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.max_new_tokens = max_new_tokens

    def _encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return tok(text)["input_ids"]

    def annotate(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> list[Annotation]:
        import torch

        out = []
        categories = ", ".join(CATEGORY_MULTIPLIERS)
        for p, c, r in zip(prompts, chosen, rejected):
            ids = self._encode(TEACHER_PROMPT.format(prompt=p, chosen=c, rejected=r, categories=categories))
            x = torch.tensor([ids], device=self.device)
            with torch.no_grad():
                gen = self.model.generate(
                    input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=self.max_new_tokens,
                    do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                )
            text = self.tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True)
            out.append(parse_teacher_answer(text) or FALLBACK)
        return out


def _teacher_task(model, max_new_tokens, trust_remote_code, prompts, chosen, rejected):
    return TeacherLLMAnnotator(model, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code).annotate(
        prompts, chosen, rejected
    )


def annotate_pairs(cfg: Any, task: Any, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                   *, trust_remote_code: bool = False) -> list[Annotation]:
    """Annotate with the annotator ``cfg`` (a ``SP2DPOConfig``) selects."""
    if cfg.annotator == "rule":
        return QualityRuleAnnotator(task).annotate(prompts, chosen, rejected)
    if cfg.annotator == "teacher":
        import ray

        remote = ray.remote(_teacher_task).options(num_cpus=1, num_gpus=cfg.teacher_num_gpus)
        return ray.get(remote.remote(cfg.teacher_model, cfg.teacher_max_new_tokens, trust_remote_code,
                                     list(prompts), list(chosen), list(rejected)))
    module, _, name = cfg.annotator.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"variant.sp2dpo.annotator: cannot import {cfg.annotator!r} ({exc})") from None
    return list(cls(task).annotate(prompts, chosen, rejected))


__all__ = ["Annotation", "FALLBACK", "QualityRuleAnnotator", "TeacherLLMAnnotator", "annotate_pairs",
           "parse_teacher_answer"]
