"""spa_ray.models.loading: tokenizer/model loading from a tmp dir, errors, checksums."""

from __future__ import annotations

import json

import pytest
import torch

try:
    from _tiny_model import make_tiny_llama, make_tiny_tokenizer, save_tiny_model_dir, torch_single_thread  # noqa: F401
except ImportError:  # repo root on sys.path instead of tests/
    from tests._tiny_model import make_tiny_llama, make_tiny_tokenizer, save_tiny_model_dir, torch_single_thread  # noqa: F401

from spa_ray.models.loading import (
    MissingChatTemplateError,
    MissingTokenizerError,
    ModelLoadError,
    load_causal_lm,
    load_tokenizer,
    model_state_to_cpu,
    state_dict_checksum,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", seed=3)


def test_model_round_trip_same_weights_eval_mode(model_dir):
    source = make_tiny_llama(make_tiny_tokenizer(), seed=3)
    model = load_causal_lm(model_dir, dtype="float32", device="cpu")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert state_dict_checksum(model) == state_dict_checksum(source)
    ids = torch.tensor([[2, 4, 7, 22, 26, 32, 5, 7]])
    torch.testing.assert_close(model(ids).logits, source(ids).logits)


def test_model_dtype_option(model_dir):
    model = load_causal_lm(model_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    auto = load_causal_lm(model_dir)  # "auto": the checkpoint's dtype
    assert next(auto.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(model_dir, dtype="int8")


def test_tokenizer_round_trip_and_padding_side(model_dir):
    tok = load_tokenizer(model_dir)
    ref = make_tiny_tokenizer()
    assert tok.padding_side == "right"
    assert tok.pad_token_id == ref.pad_token_id and tok.eos_token_id == ref.eos_token_id
    msgs = [{"role": "user", "content": "list three colors"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == ref.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert load_tokenizer(model_dir, padding_side="left").padding_side == "left"
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(model_dir, padding_side="middle")


def test_missing_tokenizer_error_names_path(tmp_path):
    path = save_tiny_model_dir(tmp_path / "no_tok", save_tokenizer=False)
    with pytest.raises(MissingTokenizerError, match="no_tok"):
        load_tokenizer(path)
    with pytest.raises(MissingTokenizerError, match="does_not_exist"):
        load_tokenizer(tmp_path / "does_not_exist")


def test_missing_chat_template_error_names_path(tmp_path):
    path = save_tiny_model_dir(tmp_path / "no_template", chat_template=False)
    with pytest.raises(MissingChatTemplateError, match="no_template"):
        load_tokenizer(path)
    tok = load_tokenizer(path, require_chat_template=False)
    assert tok.pad_token_id is not None


def test_pad_token_defaults_to_eos(tmp_path):
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<eos>"


def test_pickle_checkpoint_refused(tmp_path):
    model = make_tiny_llama(make_tiny_tokenizer(), seed=0)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # pickle only, no safetensors
    with pytest.raises(ModelLoadError, match=str(tmp_path.name)):
        load_causal_lm(tmp_path)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_causal_lm(_empty_dir(tmp_path))


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_checksum_deterministic_and_sensitive():
    model = make_tiny_llama(make_tiny_tokenizer(), seed=0)
    sd = model_state_to_cpu(model)
    c = state_dict_checksum(model)
    assert c == state_dict_checksum(sd) == state_dict_checksum(dict(reversed(list(sd.items()))))
    assert len(c) == 64
    # model_state_to_cpu is a copy: editing it changes neither the model nor its checksum
    sd["model.norm.weight"][0] += 1.0
    assert state_dict_checksum(model) == c
    assert state_dict_checksum(sd) != c
    # dtype is part of the fingerprint
    assert state_dict_checksum({k: v.double() for k, v in model.state_dict().items()}) != c
    # bf16 tensors hash too (no numpy bf16)
    assert isinstance(state_dict_checksum({"w": torch.ones(3, dtype=torch.bfloat16)}), str)
    with pytest.raises(TypeError):
        state_dict_checksum({"w": [1, 2]})


def test_config_json_is_plain(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (model_dir / "model.safetensors").exists()
