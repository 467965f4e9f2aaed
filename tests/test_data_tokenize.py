"""Chat-templated prompts, response masks and truncation rules."""

from __future__ import annotations

import pytest

from spa_ray.data import (
    ZEPHYR_CHAT_TEMPLATE,
    DataError,
    PreferencePair,
    encode_prompt,
    encode_response,
    ensure_chat_template,
    tokenize_pair,
    tokenize_preference_pair,
    tokenize_prompts,
)

try:
    from tests._tiny_tokenizer import make_tiny_tokenizer
except ImportError:
    from _tiny_tokenizer import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


PROMPT = "What is the capital of France?"
RESPONSE = "The capital of France is Paris."


def test_prompt_is_the_chat_template_with_generation_prompt(tok):
    ids = encode_prompt(tok, PROMPT)
    out = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    expected = out["input_ids"] if hasattr(out, "keys") else out
    assert ids == list(expected)
    assert tok.decode(ids) == f"<s><|user|>\n{PROMPT}</s>\n<|assistant|>\n"
    assert ids.count(tok.bos_token_id) == 1


def test_response_mask_covers_exactly_the_response_and_eos(tok):
    seq = tokenize_pair(tok, PROMPT, RESPONSE)
    r_ids = encode_response(tok, RESPONSE)
    assert r_ids[-1] == tok.eos_token_id and r_ids[:-1] == tok(RESPONSE, add_special_tokens=False)["input_ids"]
    n = len(seq.input_ids)
    assert len(seq.attention_mask) == len(seq.response_mask) == n
    assert all(a == 1 for a in seq.attention_mask)
    assert seq.response_mask == [False] * seq.prompt_len + [True] * len(r_ids)
    assert seq.response_ids == r_ids and seq.prompt_ids == encode_prompt(tok, PROMPT)
    masked = [t for t, m in zip(seq.input_ids, seq.response_mask) if m]
    assert tok.decode(masked) == RESPONSE + "</s>"
    assert tok.decode(seq.input_ids) == f"<s><|user|>\n{PROMPT}</s>\n<|assistant|>\n{RESPONSE}</s>"
    assert seq.prompt_truncated == 0 and seq.response_truncated == 0


def test_changing_the_prompt_does_not_move_response_tokens(tok):
    a = tokenize_pair(tok, PROMPT, RESPONSE)
    b = tokenize_pair(tok, "Name the capital city of France, please, in one short sentence.", RESPONSE)
    c = tokenize_pair(tok, PROMPT + " ", RESPONSE)  # boundary characters change, response ids do not
    assert a.prompt_len != b.prompt_len
    assert a.response_ids == b.response_ids == c.response_ids
    assert sum(a.response_mask) == sum(b.response_mask) == sum(c.response_mask)


def test_generated_token_ids_are_used_unchanged(tok):
    gen = tok(" Paris", add_special_tokens=False)["input_ids"]  # no EOS: generation hit the limit
    seq = tokenize_pair(tok, PROMPT, gen)
    assert seq.response_ids == gen and seq.response_len == len(gen)
    p_ids = encode_prompt(tok, PROMPT)
    assert tokenize_pair(tok, p_ids, gen).input_ids == seq.input_ids


def test_prompt_truncation_keep_end_keep_start_error(tok):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    full = encode_prompt(tok, long_prompt)
    assert len(full) > 64
    end = tokenize_pair(tok, long_prompt, RESPONSE, max_prompt_len=64, max_total_len=200)
    assert end.prompt_ids == full[-64:] and end.prompt_len == 64
    assert end.prompt_truncated == len(full) - 64
    assert tok.decode(end.prompt_ids).endswith("<|assistant|>\n")  # generation prompt survives
    start = tokenize_pair(tok, long_prompt, RESPONSE, max_prompt_len=64, max_total_len=200, truncation="keep_start")
    assert start.prompt_ids == full[:64]
    assert end.response_ids == start.response_ids == encode_response(tok, RESPONSE)
    with pytest.raises(DataError, match="max_prompt_len") as ei:
        tokenize_pair(tok, long_prompt, RESPONSE, max_prompt_len=64, max_total_len=200, truncation="error", file="f.jsonl", row=4)
    assert ei.value.field == "prompt" and ei.value.row == 4 and "f.jsonl" in str(ei.value)


def test_response_truncated_from_the_right_to_fit_total(tok):
    long_resp = " ".join(f"token{i}" for i in range(300))
    full_r = encode_response(tok, long_resp)
    p = encode_prompt(tok, PROMPT)
    seq = tokenize_pair(tok, PROMPT, long_resp, max_prompt_len=32, max_total_len=64)
    assert len(seq) == 64 and seq.prompt_ids == p
    assert seq.response_ids == full_r[: 64 - len(p)]
    assert seq.response_ids[-1] != tok.eos_token_id  # a cut response has no EOS
    assert seq.response_truncated == len(full_r) - (64 - len(p))
    assert sum(seq.response_mask) == 64 - len(p)
    with pytest.raises(DataError, match="max_total_len"):
        tokenize_pair(tok, PROMPT, long_resp, max_prompt_len=32, max_total_len=64, truncation="error")


def test_prompt_truncation_then_response_fits(tok):
    long_prompt = "why " * 100
    long_resp = "because " * 100
    seq = tokenize_pair(tok, long_prompt, long_resp, max_prompt_len=20, max_total_len=30)
    assert seq.prompt_len == 20 and seq.response_len == 10 and len(seq) == 30


def test_empty_response_ids_and_bad_config(tok):
    with pytest.raises(DataError) as ei:
        tokenize_pair(tok, PROMPT, [], file="gen.parquet", row=7)
    assert ei.value.field == "response" and "gen.parquet" in str(ei.value) and "row 7" in str(ei.value)
    with pytest.raises(ValueError, match="smaller"):
        tokenize_pair(tok, PROMPT, RESPONSE, max_prompt_len=64, max_total_len=64)
    with pytest.raises(ValueError, match="truncation"):
        tokenize_pair(tok, PROMPT, RESPONSE, truncation="middle")


def test_preference_pair_shares_prompt_tokens(tok):
    pair = PreferencePair(PROMPT * 5, "Paris. " * 40, "Lyon.", file="uf.jsonl", row=3)
    tp = tokenize_preference_pair(tok, pair, max_prompt_len=40, max_total_len=80)
    assert tp.chosen.prompt_ids == tp.rejected.prompt_ids and tp.chosen.prompt_len == 40
    assert tp.chosen.response_truncated > 0 and tp.rejected.response_truncated == 0
    assert tp.rejected.response_ids == encode_response(tok, "Lyon.")
    assert len(tp) == len(tp.chosen) == 80
    with pytest.raises(DataError) as ei:
        tokenize_preference_pair(tok, pair, max_prompt_len=40, max_total_len=80, truncation="error")
    assert ei.value.file == "uf.jsonl" and ei.value.row == 3 and ei.value.field == "prompt"
    short_prompt = PreferencePair(PROMPT, "Paris. " * 40, "Lyon.", file="uf.jsonl", row=3)
    with pytest.raises(DataError) as ei:
        tokenize_preference_pair(tok, short_prompt, max_prompt_len=40, max_total_len=80, truncation="error")
    assert ei.value.field == "chosen"


def test_auto_bos_for_templates_without_bos():
    # a Mistral/zephyr-like tokenizer: plain encoding adds <s>, the template does not.
    t = make_tiny_tokenizer(add_bos_on_encode=True, chat_template=ZEPHYR_CHAT_TEMPLATE)
    ids = encode_prompt(t, PROMPT)
    assert ids[0] == t.bos_token_id and ids[1] != t.bos_token_id
    assert t.decode(ids) == f"<s><|user|>\n{PROMPT}</s>\n<|assistant|>\n"
    assert encode_prompt(t, PROMPT, add_bos=False)[0] != t.bos_token_id
    # a template that already starts with BOS is not given a second one
    t2 = make_tiny_tokenizer(add_bos_on_encode=True)
    assert encode_prompt(t2, PROMPT).count(t2.bos_token_id) == 1
    # the response is never given a BOS
    assert encode_response(t, RESPONSE)[0] != t.bos_token_id


def test_ensure_chat_template_and_system_prompt():
    t = make_tiny_tokenizer()
    t.chat_template = None
    ensure_chat_template(t)
    assert t.chat_template == ZEPHYR_CHAT_TEMPLATE
    ids = encode_prompt(t, "hi", system="Be nice.")
    assert t.decode(ids) == "<|system|>\nBe nice.</s>\n<|user|>\nhi</s>\n<|assistant|>\n"
    custom = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert ensure_chat_template(t, custom).chat_template == ZEPHYR_CHAT_TEMPLATE  # kept: already set
    assert ensure_chat_template(t, custom, force=True).chat_template == custom


def test_tokenize_prompts_for_generation(tok):
    out = tokenize_prompts(tok, [PROMPT, "x " * 300], max_prompt_len=50)
    assert out[0] == encode_prompt(tok, PROMPT)
    assert len(out[1]) == 50 and tok.decode(out[1]).endswith("<|assistant|>\n")
