"""A tiny byte-level BPE tokenizer built offline, for tests (no downloads).

``make_tiny_tokenizer()`` returns a ``transformers.PreTrainedTokenizerFast`` trained on the
text of ``tests/fixtures/ultrafeedback_tiny.jsonl`` (byte-level, so ANY text round-trips
without unknown tokens), with special tokens ``<pad>``=0, ``<s>``=1 (bos), ``</s>``=2 (eos),
``<|user|>``, ``<|assistant|>``, ``<|system|>``, and a zephyr-style chat template:
``<s><|user|>\\n{prompt}</s>\\n<|assistant|>\\n``. Each call returns a fresh copy (tests may
mutate it); the training itself is cached per process.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "ultrafeedback_tiny.jsonl"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _fixture_texts() -> list[str]:
    texts = []
    with open(FIXTURE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["prompt"])
            for side in ("chosen", "rejected"):
                texts.extend(m["content"] for m in row[side])
    return texts


@functools.lru_cache(maxsize=None)
def _trained(vocab_size: int, add_bos_on_encode: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_fixture_texts(), trainer)
    if add_bos_on_encode:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = TINY_CHAT_TEMPLATE
    return hf


def make_tiny_tokenizer(*, vocab_size: int = 400, add_bos_on_encode: bool = False, chat_template: str | None = None):
    """A fresh tiny tokenizer. ``add_bos_on_encode``: plain-text encoding with special
    tokens prepends ``<s>`` (like Llama/Mistral tokenizers). ``chat_template`` replaces the
    default template."""
    hf = copy.deepcopy(_trained(vocab_size, add_bos_on_encode))
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def save_tiny_tokenizer(path, **kwargs) -> Path:
    """Write a tiny tokenizer with ``save_pretrained`` (loadable by AutoTokenizer) to ``path``."""
    path = Path(path)
    make_tiny_tokenizer(**kwargs).save_pretrained(str(path))
    return path
