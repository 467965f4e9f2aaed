"""spa_ray.generation.base and the pure helpers of vllm_backend (vLLM itself is not run)."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest
import torch

from spa_ray.generation.base import GeneratedSequence, GeneratorBackend, SamplingConfig, prompt_occurrences, row_seed
from spa_ray.generation.vllm_backend import checkpoint_dtype, request_seed, vllm_engine_kwargs, vllm_sampling_kwargs
from spa_ray.weights.packing import iter_state_dict_chunks, record_to_tensor, tensor_to_record
from spa_ray.weights.vllm_worker import WORKER_EXTENSION_CLS


def test_sampling_config_defaults_match_spa():
    s = SamplingConfig()
    assert (s.n, s.temperature, s.top_p, s.max_new_tokens, s.seed) == (2, 0.7, 1.0, 300, 0)
    assert s.to_dict()["temperature"] == 0.7
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.n = 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": 1.5},
        {"temperature": -0.1},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.1},
        {"max_new_tokens": 0},
        {"seed": -1},
        {"n": True},
    ],
)
def test_sampling_config_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_row_seed_keys():
    s = row_seed(0, "p", 0, 0)
    assert s == row_seed(0, "p", 0, 0)
    assert 0 <= s < 2**63
    assert len({s, row_seed(1, "p", 0, 0), row_seed(0, "q", 0, 0), row_seed(0, "p", 1, 0), row_seed(0, "p", 0, 1)}) == 5
    assert prompt_occurrences(["a", "b", "a", "a"]) == [0, 0, 1, 2]


def test_backend_is_abstract_and_sequence_fields():
    with pytest.raises(TypeError):
        GeneratorBackend()
    g = GeneratedSequence(0, 1, [2, 4], [5, 3], "x", [-0.1, -0.2], "stop")
    assert g.raw_logprobs is None and g.to_dict()["sample_index"] == 1


def test_vllm_module_imports_without_vllm():
    # importing the module must not import vllm (CPU installs have none)
    mod = importlib.import_module("spa_ray.generation.vllm_backend")
    assert "vllm" not in mod.__dict__
    if "vllm" not in sys.modules:
        with pytest.raises(ImportError, match=r"spa-ray\[gpu\]"):
            mod.VLLMGenerator("/nonexistent")


def test_vllm_sampling_kwargs():
    kw = vllm_sampling_kwargs(SamplingConfig(n=2, temperature=0.7, top_p=0.9, max_new_tokens=300, seed=4))
    assert kw == dict(n=2, temperature=0.7, top_p=0.9, max_tokens=300, seed=4, skip_special_tokens=True, logprobs=0)
    kw = vllm_sampling_kwargs(SamplingConfig(), seed=123, logprobs=False)
    assert kw["seed"] == 123 and "logprobs" not in kw
    assert 0 <= request_seed(0, "p", 0) < 2**31
    with pytest.raises(TypeError):
        vllm_sampling_kwargs({"n": 2})


def test_vllm_engine_kwargs():
    kw = vllm_engine_kwargs("/models/pi_0", dtype="bfloat16", seed=3, max_model_len=1024)
    assert kw["model"] == kw["tokenizer"] == "/models/pi_0"
    assert kw["load_format"] == "safetensors" and kw["trust_remote_code"] is False
    assert kw["worker_extension_cls"] == WORKER_EXTENSION_CLS
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["max_model_len"] == 1024
    assert "logprobs_mode" not in vllm_engine_kwargs("m", logprobs_mode=None)
    assert vllm_engine_kwargs("m", extra={"enforce_eager": True})["enforce_eager"] is True
    for bad in ({"tensor_parallel_size": 0}, {"gpu_memory_utilization": 1.5}, {"logprobs_mode": "x"}, {"dtype": "int4"}):
        with pytest.raises(ValueError):
            vllm_engine_kwargs("m", **bad)
    # the extension class path resolves to a class with the RPC method
    module, _, name = WORKER_EXTENSION_CLS.rpartition(".")
    ext = getattr(importlib.import_module(module), name)
    assert all(hasattr(ext, m) for m in ("spa_update_begin", "spa_update_chunk", "spa_update_finish",
                                         "spa_reload_from_path", "spa_weights_info"))


def test_weight_records_round_trip_bytes_only():
    """What crosses vLLM's RPC: plain (str, str, list, bytes), rebuilt bit-exactly."""
    sd = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.zeros(0, 2), "d": torch.arange(6).reshape(2, 3)}
    for name, t in sd.items():
        record = tensor_to_record(name, t.t() if t.dim() == 2 and t.numel() else t)  # non-contiguous too
        assert [type(x) for x in record] == [str, str, list, bytes]
        back_name, back = record_to_tensor(record)
        want = t.t() if t.dim() == 2 and t.numel() else t
        assert back_name == name and back.dtype == want.dtype and torch.equal(back, want)
    name, dtype, shape, data = tensor_to_record("a", sd["a"])
    with pytest.raises(ValueError, match="'a': 47 bytes"):
        record_to_tensor((name, dtype, shape, data[:-1]))
    with pytest.raises(ValueError, match="unknown dtype"):
        record_to_tensor((name, "float99", shape, data))


def test_iter_state_dict_chunks():
    sd = {f"w{i}": torch.zeros(10, dtype=torch.float32) for i in range(5)}  # 40 bytes each
    chunks = list(iter_state_dict_chunks(sd, max_bytes=100))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [n for c in chunks for n, _ in c] == list(sd)
    assert [len(c) for c in iter_state_dict_chunks({"big": torch.zeros(100)}, max_bytes=10)] == [1]


def test_vllm_auto_dtype_is_the_checkpoints(tmp_path):
    """vLLM's CPU backend would downcast float32 to bfloat16 on "auto"; the generator passes
    the checkpoint's own dtype, as the trainer and judges load it."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert checkpoint_dtype(tmp_path) == "float32" == vllm_engine_kwargs(tmp_path)["dtype"]
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert checkpoint_dtype(tmp_path) == "bfloat16"
    assert checkpoint_dtype(tmp_path, "float16") == "float16"
    assert checkpoint_dtype(tmp_path / "missing") == "auto"  # a hub id: vLLM decides
