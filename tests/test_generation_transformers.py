"""spa_ray.generation.transformers_backend on a tiny random Llama (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

try:
    from _tiny_model import make_tiny_llama, make_tiny_tokenizer, save_tiny_model_dir, torch_single_thread  # noqa: F401
except ImportError:
    from tests._tiny_model import make_tiny_llama, make_tiny_tokenizer, save_tiny_model_dir, torch_single_thread  # noqa: F401

from spa_ray.generation.base import FINISH_LENGTH, FINISH_STOP, SamplingConfig
from spa_ray.generation.transformers_backend import TransformersGenerator, sample_from_logits
from spa_ray.models.loading import model_state_to_cpu, state_dict_checksum
from spa_ray.models.scoring import batched_sequence_logprobs

PROMPTS = ["list three colors", "name two animals please", "yes", "give me one fruit in sorted order"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer(padding_side="left")


@pytest.fixture(scope="module")
def gen(tok):
    return TransformersGenerator.from_model(make_tiny_llama(tok, seed=0), tok, max_batch_size=3)


@pytest.fixture(scope="module")
def outputs(gen):
    return gen.generate(PROMPTS, SamplingConfig(n=3, temperature=0.7, max_new_tokens=MAX_NEW, seed=5))


def test_n_samples_per_prompt_in_prompt_order(gen, tok, outputs):
    assert len(outputs) == len(PROMPTS) * 3
    assert [(s.prompt_index, s.sample_index) for s in outputs] == [(i, j) for i in range(4) for j in range(3)]
    for s in outputs:
        assert s.prompt_ids == gen.encode_prompt(PROMPTS[s.prompt_index])
        assert s.prompt_ids[0] == tok.bos_token_id
    # the samples of a prompt differ (different seeds per sample)
    assert len({tuple(s.response_ids) for s in outputs[:3]}) > 1


def test_responses_end_at_eos_or_max_new_tokens(tok, outputs):
    eos = tok.eos_token_id
    reasons = set()
    for s in outputs:
        assert 1 <= len(s.response_ids) <= MAX_NEW
        assert eos not in s.response_ids[:-1]  # cut at the FIRST eos
        if s.finish_reason == FINISH_STOP:
            assert s.response_ids[-1] == eos  # EOS kept in the response
        else:
            assert s.finish_reason == FINISH_LENGTH
            assert len(s.response_ids) == MAX_NEW and s.response_ids[-1] != eos
        assert s.text == tok.decode(s.response_ids, skip_special_tokens=True)
        assert "<eos>" not in s.text
        reasons.add(s.finish_reason)
    assert reasons == {FINISH_STOP, FINISH_LENGTH}  # this seed exercises both paths


def test_logprobs_align_with_response(outputs):
    for s in outputs:
        assert len(s.logprobs) == len(s.response_ids) == len(s.raw_logprobs)
        assert all(x <= 1e-6 and math.isfinite(x) for x in s.logprobs)


def test_deterministic_and_independent_of_batch_split(gen, tok, outputs):
    sampling = SamplingConfig(n=3, temperature=0.7, max_new_tokens=MAX_NEW, seed=5)
    again = gen.generate(PROMPTS, sampling)
    assert [s.response_ids for s in again] == [s.response_ids for s in outputs]
    assert [s.logprobs for s in again] == [s.logprobs for s in outputs]
    other_split = TransformersGenerator.from_model(gen.model, tok, max_batch_size=5).generate(PROMPTS, sampling)
    assert [s.response_ids for s in other_split] == [s.response_ids for s in outputs]
    # a prompt's samples depend on its text, not its position in the list
    reordered = gen.generate(PROMPTS[::-1], sampling)
    assert [s.response_ids for s in reordered[:3]] == [s.response_ids for s in outputs[-3:]]
    other_seed = gen.generate(PROMPTS, SamplingConfig(n=3, temperature=0.7, max_new_tokens=MAX_NEW, seed=6))
    assert [s.response_ids for s in other_seed] != [s.response_ids for s in outputs]


def test_repeated_prompt_gets_fresh_samples(gen):
    p = "list three colors"
    out = gen.generate([p, p], SamplingConfig(n=3, max_new_tokens=MAX_NEW, seed=0))
    assert [s.response_ids for s in out[:3]] != [s.response_ids for s in out[3:]]


def test_temperature_one_logprobs_match_teacher_forcing(gen, tok):
    out = gen.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, max_new_tokens=MAX_NEW, seed=1))
    tf = batched_sequence_logprobs(gen.model, [s.prompt_ids for s in out], [s.response_ids for s in out], tok.pad_token_id)
    for s, ref in zip(out, tf.tolist()):
        assert sum(s.logprobs) == pytest.approx(ref, abs=1e-4)  # T=1, top_p=1: sampling dist = model
        assert sum(s.raw_logprobs) == pytest.approx(ref, abs=1e-4)


def test_tempered_logprobs_differ_from_raw(outputs):
    s = next(s for s in outputs if len(s.response_ids) > 3)
    assert s.logprobs != pytest.approx(s.raw_logprobs, abs=1e-3)


def test_tiny_top_p_is_greedy(gen, tok):
    out = gen.generate(PROMPTS[:2], SamplingConfig(n=2, top_p=1e-6, max_new_tokens=6, seed=3))
    assert out[0].response_ids == out[1].response_ids
    assert all(x == 0.0 for s in out for x in s.logprobs)  # the only kept token has prob 1
    ids = torch.tensor([out[0].prompt_ids])
    greedy = gen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    g = greedy[0, ids.shape[1]:].tolist()
    assert out[0].response_ids == g[: len(out[0].response_ids)]


def test_sample_from_logits_matches_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    n = 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # a deterministic uniform grid
    tokens, lp, raw = sample_from_logits(logits.expand(n, -1), u, temperature=0.7)
    probs = torch.softmax(logits[0] / 0.7, -1)
    freq = torch.bincount(tokens, minlength=5).double() / n
    torch.testing.assert_close(freq, probs.double(), atol=1e-3, rtol=0)
    torch.testing.assert_close(lp, torch.log(probs)[tokens], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw, torch.log_softmax(logits[0], -1)[tokens], atol=1e-5, rtol=0)
    # top-p: keeps the smallest prefix reaching the mass, renormalised
    tokens, lp, _ = sample_from_logits(logits.expand(n, -1), u, temperature=1.0, top_p=0.6)
    p = torch.softmax(logits[0], -1)  # sorted: 0 (0.47), 1 (0.17), ...: prefix {0, 1} reaches 0.6
    kept = p[[0, 1]] / p[[0, 1]].sum()
    freq = torch.bincount(tokens, minlength=5).double() / n
    torch.testing.assert_close(freq, torch.tensor([kept[0], kept[1], 0, 0, 0], dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(lp.exp(), kept[torch.where(tokens == 0, 0, 1)], atol=1e-5, rtol=0)


def test_greedy_is_argmax_first_of_ties_with_untempered_logprobs():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 0.2, 0.49]])
    tokens, lp, raw = sample_from_logits(logits, torch.tensor([0.99, 0.01]), temperature=0.0)
    assert tokens.tolist() == [1, 0]  # a tie goes to the lower id, whatever the uniform
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])
    torch.testing.assert_close(raw, lp)


def test_load_weights_changes_outputs_and_checksum(tok):
    g = TransformersGenerator.from_model(make_tiny_llama(tok, seed=0), tok, max_batch_size=4)
    sampling = SamplingConfig(n=2, max_new_tokens=8, seed=0)
    before = g.generate(PROMPTS, sampling)
    other = make_tiny_llama(tok, seed=7)
    assert g.weights_version == 0
    g.load_weights(model_state_to_cpu(other), version=3)
    assert g.weights_version == 3
    assert g.weights_checksum() == state_dict_checksum(other)
    after = g.generate(PROMPTS, sampling)
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    same = TransformersGenerator.from_model(other, tok, max_batch_size=4).generate(PROMPTS, sampling)
    assert [s.response_ids for s in after] == [s.response_ids for s in same]


def test_load_weights_is_strict(tok):
    g = TransformersGenerator.from_model(make_tiny_llama(tok, seed=0), tok)
    sd = model_state_to_cpu(make_tiny_llama(tok, seed=1))
    checksum = g.weights_checksum()
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="missing"):
        g.load_weights(missing, version=1)
    with pytest.raises(ValueError, match="unexpected"):
        g.load_weights({**sd, "extra.weight": torch.zeros(1)}, version=1)
    with pytest.raises(ValueError, match="shape"):
        g.load_weights({**sd, "model.norm.weight": torch.zeros(3)}, version=1)
    assert g.weights_checksum() == checksum and g.weights_version == 0


def test_load_weights_tied_embeddings_key_may_be_absent(tok):
    model = make_tiny_llama(tok, seed=0, tie_word_embeddings=True)
    g = TransformersGenerator.from_model(model, tok)
    src = make_tiny_llama(tok, seed=2, tie_word_embeddings=True)
    sd = {k: v for k, v in model_state_to_cpu(src).items() if k != "lm_head.weight"}
    g.load_weights(sd, version=1)
    assert torch.equal(g.model.lm_head.weight, src.lm_head.weight)


def test_from_path(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m", seed=0)
    g = TransformersGenerator(path, device="cpu", dtype="float32", max_batch_size=2)
    assert g.tokenizer.padding_side == "left"
    out = g.generate(["yes"], SamplingConfig(n=2, max_new_tokens=4, seed=0))
    assert len(out) == 2 and all(1 <= len(s.response_ids) <= 4 for s in out)


def test_generate_from_ids_and_validation(gen):
    ids = gen.encode_prompt("yes")
    a = gen.generate_from_ids([ids], SamplingConfig(n=1, max_new_tokens=4, seed=0), prompt_keys=["yes"])
    b = gen.generate(["yes"], SamplingConfig(n=1, max_new_tokens=4, seed=0))
    assert a[0].response_ids == b[0].response_ids
    with pytest.raises(ValueError):
        gen.generate_from_ids([[]], SamplingConfig(n=1))
    with pytest.raises(TypeError):
        gen.generate(["yes"], {"n": 2})
