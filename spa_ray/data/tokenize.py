"""Chat templates and tokenisation of (prompt, response) with a response mask.

Choice: the prompt and the response are tokenised SEPARATELY and concatenated.

* prompt ids  = ``tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
  add_generation_prompt=True, tokenize=True)`` (plus a BOS, see ``add_bos``);
* response ids = ``tokenizer(response, add_special_tokens=False).input_ids + [eos]``,
  or, when the response is already a list of token ids (what a generator produced),
  those ids unchanged.

Tokenising ``template(prompt) + response`` jointly can merge tokens across the boundary
(BPE) so that the response tokens depend on the prompt and differ from what the generator
sampled; scoring ``log pi(y|x)`` must use exactly the sampled tokens, so we never do that.
Consequence: the response tokens are independent of the prompt.

Truncation (TRL-like), applied to every sequence the same way:

1. the prompt is cut to ``max_prompt_len`` tokens: ``truncation="keep_end"`` (default)
   keeps its LAST tokens (drops from the left, like TRL), ``"keep_start"`` keeps the first
   ones, ``"error"`` raises :class:`DataError` instead of truncating anything;
2. the response is cut from the right to fit ``max_total_len - len(prompt)`` (a cut
   response loses its EOS, as it would have when generation hit the token limit);
3. if no response token remains, :class:`DataError` (field ``response``/``chosen``/...).

Because step 1 does not look at the response, the chosen and the rejected sequence of a
pair always share exactly the same prompt tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .records import PreferencePair

__all__ = [
    "ZEPHYR_CHAT_TEMPLATE",
    "TRUNCATION_MODES",
    "TokenizedSequence",
    "TokenizedPair",
    "ensure_chat_template",
    "encode_prompt",
    "encode_response",
    "truncate_prompt_ids",
    "tokenize_pair",
    "tokenize_preference_pair",
    "tokenize_prompts",
]

#: The zephyr chat format used by the paper's SFT model (alignment-handbook
#: zephyr-7b-sft-full): ``<|user|>\n{prompt}</s>\n<|assistant|>\n{response}</s>``.
#: Only a fallback for tokenizers that ship no chat template (see ensure_chat_template).
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TRUNCATION_MODES = ("keep_end", "keep_start", "error")


@dataclass(frozen=True)
class TokenizedSequence:
    """One prompt+response sequence (unpadded, plain lists).

    ``response_mask[i]`` is True exactly on the response tokens (``input_ids[prompt_len:]``),
    including the EOS that ends an untruncated text response. ``prompt_truncated`` /
    ``response_truncated`` count the tokens dropped by truncation.
    """

    input_ids: list[int]
    attention_mask: list[int]
    response_mask: list[bool]
    prompt_len: int
    response_len: int
    prompt_truncated: int = 0
    response_truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_len]

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len :]


@dataclass(frozen=True)
class TokenizedPair:
    """A tokenised preference pair; ``chosen`` and ``rejected`` share the prompt tokens."""

    chosen: TokenizedSequence
    rejected: TokenizedSequence

    def __len__(self) -> int:  # the longer of the two: what a padded batch must hold
        return max(len(self.chosen), len(self.rejected))


def ensure_chat_template(tokenizer: Any, template: str | None = None, *, force: bool = False) -> Any:
    """Give ``tokenizer`` a chat template when it has none (or always, with ``force``):
    ``template`` or :data:`ZEPHYR_CHAT_TEMPLATE`. Returns the same tokenizer."""
    if force or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template or ZEPHYR_CHAT_TEMPLATE
    return tokenizer


def _ids_of(out: Any) -> list[int]:
    """apply_chat_template returns a list (transformers 4) or a BatchEncoding (5)."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):  # batched form of a single conversation
        if len(out) != 1:
            raise ValueError("apply_chat_template returned more than one sequence")
        out = list(out[0])
    return [int(t) for t in out]


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    system: str | None = None,
    chat_template: str | None = None,
    add_bos: bool | None = None,
) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the generation prompt.

    ``add_bos=None`` (auto): prepend ``bos_token_id`` when the tokenizer adds a BOS to plain
    text by default and the template did not already put one first. This matches rendering
    the template to text and tokenising it with special tokens (how zephyr/Mistral SFT
    models saw their data), without also appending an EOS.
    """
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    kwargs = {"add_generation_prompt": True, "tokenize": True}
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    ids = _ids_of(tokenizer.apply_chat_template(messages, **kwargs))
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        add_bos = _adds_bos(tokenizer)
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def encode_response(tokenizer: Any, response: str | Sequence[int], *, add_eos: bool = True) -> list[int]:
    """Token ids of a response: text -> its tokens (no special tokens) + EOS; a sequence of
    ints (generator output) -> those ids unchanged."""
    if isinstance(response, str):
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if add_eos:
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                raise ValueError("tokenizer has no eos_token_id; cannot terminate responses")
            ids.append(int(eos))
        return ids
    return [int(t) for t in response]


def _check_lengths(max_prompt_len: int, max_total_len: int, truncation: str) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_prompt_len < 1 or max_total_len < 2:
        raise ValueError("max_prompt_len must be >= 1 and max_total_len >= 2")
    if max_prompt_len >= max_total_len:
        raise ValueError(
            f"max_prompt_len ({max_prompt_len}) must be smaller than max_total_len ({max_total_len})"
        )


def truncate_prompt_ids(
    ids: list[int],
    max_prompt_len: int,
    truncation: str = "keep_end",
    *,
    file: str | None = None,
    row: int | None = None,
    field: str = "prompt",
) -> list[int]:
    """Apply rule 1 of the module docstring to prompt ids."""
    if len(ids) <= max_prompt_len:
        return ids
    if truncation == "keep_end":
        return ids[-max_prompt_len:]
    if truncation == "keep_start":
        return ids[:max_prompt_len]
    raise DataError(
        f"prompt has {len(ids)} tokens, more than max_prompt_len={max_prompt_len} (truncation='error')",
        file=file,
        row=row,
        field=field,
    )


def tokenize_pair(
    tokenizer: Any,
    prompt: str | Sequence[int],
    response: str | Sequence[int],
    *,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
    truncation: str = "keep_end",
    system: str | None = None,
    add_bos: bool | None = None,
    file: str | None = None,
    row: int | None = None,
    response_field: str = "response",
) -> TokenizedSequence:
    """Tokenise one (prompt, response) into ``input_ids``/``attention_mask``/``response_mask``.

    ``prompt``: text (chat-formatted by :func:`encode_prompt`) or already-encoded prompt ids.
    ``response``: text (+EOS) or generated token ids (unchanged). ``file``/``row``/
    ``response_field`` only label a :class:`DataError`.
    """
    _check_lengths(max_prompt_len, max_total_len, truncation)
    p_ids = encode_prompt(tokenizer, prompt, system=system, add_bos=add_bos) if isinstance(prompt, str) else [
        int(t) for t in prompt
    ]
    r_ids = encode_response(tokenizer, response)
    return _assemble(p_ids, r_ids, max_prompt_len, max_total_len, truncation, file, row, response_field)


def _assemble(p_ids, r_ids, max_prompt_len, max_total_len, truncation, file, row, response_field):
    if not r_ids:
        raise DataError("response has no tokens", file=file, row=row, field=response_field)
    n_p = len(p_ids)
    p_ids = truncate_prompt_ids(p_ids, max_prompt_len, truncation, file=file, row=row)
    room = max_total_len - len(p_ids)
    n_r = len(r_ids)
    if n_r > room:
        if truncation == "error":
            raise DataError(
                f"prompt+response have {len(p_ids) + n_r} tokens, more than max_total_len={max_total_len} "
                "(truncation='error')",
                file=file,
                row=row,
                field=response_field,
            )
        r_ids = r_ids[:room]
    if not r_ids:  # unreachable while max_prompt_len < max_total_len; kept as a guard
        raise DataError("no response token left after truncation", file=file, row=row, field=response_field)
    ids = list(p_ids) + list(r_ids)
    return TokenizedSequence(
        input_ids=ids,
        attention_mask=[1] * len(ids),
        response_mask=[False] * len(p_ids) + [True] * len(r_ids),
        prompt_len=len(p_ids),
        response_len=len(r_ids),
        prompt_truncated=n_p - len(p_ids),
        response_truncated=n_r - len(r_ids),
    )


def tokenize_preference_pair(
    tokenizer: Any,
    pair: PreferencePair,
    *,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
    truncation: str = "keep_end",
    system: str | None = None,
    add_bos: bool | None = None,
) -> TokenizedPair:
    """Tokenise both sides of a pair (the prompt is encoded once); errors name the pair's
    file/row and the field ``chosen``/``rejected``/``prompt``."""
    _check_lengths(max_prompt_len, max_total_len, truncation)
    p_ids = encode_prompt(tokenizer, pair.prompt, system=system, add_bos=add_bos)
    out = {}
    for side in ("chosen", "rejected"):
        r_ids = encode_response(tokenizer, getattr(pair, side))
        out[side] = _assemble(p_ids, r_ids, max_prompt_len, max_total_len, truncation, pair.file, pair.row, side)
    return TokenizedPair(**out)


def tokenize_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_prompt_len: int = 1024,
    truncation: str = "keep_end",
    system: str | None = None,
    add_bos: bool | None = None,
) -> list[list[int]]:
    """Chat-formatted, truncated prompt ids for generation (pad with collate_prompts)."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if add_bos is None:
        add_bos = _adds_bos(tokenizer)
    return [
        truncate_prompt_ids(encode_prompt(tokenizer, p, system=system, add_bos=add_bos), max_prompt_len, truncation, row=i)
        for i, p in enumerate(prompts)
    ]
