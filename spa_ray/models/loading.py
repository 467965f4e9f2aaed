"""Loading tokenizers and causal LMs (HF ids or local paths), and weight fingerprints.

- Checkpoints are read with ``use_safetensors=True`` only: a pickle (``.bin``) checkpoint
  is refused, never unpickled.
- ``trust_remote_code`` is off unless the caller turns it on.
- Errors name the path that was asked for, so a bad config entry is easy to find.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "ModelLoadError",
    "check_model_folder",
    "MissingTokenizerError",
    "MissingChatTemplateError",
    "load_tokenizer",
    "load_causal_lm",
    "resolve_dtype",
    "state_dict_checksum",
    "ChecksumAccumulator",
    "load_checkpoint_state_dict",
    "checkpoint_tensor_names",
    "model_state_to_cpu",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Files whose presence means "a tokenizer was saved here" (fast, sentencepiece, BPE).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class ModelLoadError(OSError):
    """A model or tokenizer could not be loaded; the message names the path."""


class MissingTokenizerError(ModelLoadError):
    """No tokenizer at the given path."""


class MissingChatTemplateError(ValueError):
    """The tokenizer loaded but has no chat template (and one is required)."""


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """"auto" stays "auto" (the checkpoint's dtype); names map to torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}") from None


def load_tokenizer(
    name_or_path: str | os.PathLike,
    trust_remote_code: bool = False,
    padding_side: str = "right",
    require_chat_template: bool = True,
):
    """AutoTokenizer for `name_or_path` with a pad token and the requested padding side.

    - pad token: set to the eos token when the tokenizer has none (``pad_token_id`` is
      then eos; training masks come from ``response_mask``/``attention_mask``, never from
      comparing ids with pad).
    - padding_side: "right" for training/scoring batches, "left" for generation.
    - require_chat_template: raise MissingChatTemplateError when the tokenizer has no
      chat template (prompts are always rendered through it).
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    path = os.fspath(name_or_path)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise MissingTokenizerError(
            f"no tokenizer found in {path!r} (none of {', '.join(_TOKENIZER_FILES)}); "
            "save one there with tokenizer.save_pretrained(path)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, EnvironmentError from hub lookups
        raise MissingTokenizerError(f"could not load a tokenizer from {path!r}: {exc}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"tokenizer at {path!r} has neither a pad token nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise MissingChatTemplateError(
            f"tokenizer at {path!r} has no chat template; set tokenizer.chat_template and "
            "save it, or pass require_chat_template=False"
        )
    return tok


def load_causal_lm(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """AutoModelForCausalLM from safetensors only, moved to `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = os.fspath(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise ModelLoadError(f"no model config.json in {path!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"could not load a causal LM from {path!r} (safetensors weights required): {exc}"
        ) from exc
    model.to(device)
    model.eval()
    return model


def build_causal_lm(
    model_class: type,
    config: Any,
    state_dict: Mapping[str, torch.Tensor],
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
):
    """The model ``load_causal_lm`` would give for a folder holding ``config`` and
    ``state_dict``, built from memory (the trainer's warm stages); the tensors are copied."""
    state = {k: v.clone() for k, v in state_dict.items()}  # object-store views are read-only
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=resolve_dtype(dtype),
                                        use_safetensors=True)  # no file is read; the audit wants it said
    model.to(device)
    model.eval()
    return model


def check_model_folder(name_or_path: str | os.PathLike) -> None:
    """For a local folder: ModelLoadError naming it unless it holds config.json and
    safetensors weights (a pickle-only checkpoint is refused before anything loads it).
    Hub ids are left to ``from_pretrained`` (``use_safetensors=True``)."""
    path = os.fspath(name_or_path)
    if not os.path.isdir(path):
        return
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelLoadError(f"no model config.json in {path!r}")
    if not any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in os.listdir(path)):
        pickled = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise ModelLoadError(
            f"no safetensors weights in {path!r}"
            + (f" (found {', '.join(pickled)}: pickle checkpoints are refused, never unpickled)" if pickled else "")
            + "; save the model with save_pretrained(path, safe_serialization=True)"
        )


def _state_dict_of(model_or_state_dict) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise TypeError(f"expected an nn.Module or a mapping of tensors, got {type(model_or_state_dict).__name__}")


def state_dict_checksum(model_or_state_dict) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and bytes, in sorted name order.

    Deterministic across processes and devices: equal iff the same names hold bit-equal
    tensors of the same dtype. Use it to check that weights reached an actor.
    """
    sd = _state_dict_of(model_or_state_dict)
    acc = ChecksumAccumulator()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is not a tensor ({type(t).__name__})")
        acc.update(name, t)
    return acc.hexdigest()


def _safetensors_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in checkpoint folder {str(path)!r}")
    return files


def load_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained (safetensors, possibly sharded) folder, on CPU."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(path):
        sd.update(load_file(str(f), device="cpu"))
    return sd


def checkpoint_tensor_names(path: str | os.PathLike) -> list[str]:
    """Tensor names stored in a checkpoint folder (reads headers only)."""
    from safetensors import safe_open

    names: list[str] = []
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as fh:
            names.extend(fh.keys())
    return sorted(names)


class ChecksumAccumulator:
    """``state_dict_checksum`` fed one tensor at a time, in sorted name order.

    For receivers that see tensors one by one (the NCCL path) and must not keep them all.
    ``update`` in sorted order, then ``hexdigest`` equals state_dict_checksum of the dict.
    """

    def __init__(self):
        self._h = hashlib.sha256()
        self._last: str | None = None

    def update(self, name: str, t: torch.Tensor) -> None:
        if self._last is not None and name <= self._last:
            raise ValueError(f"tensors must come in sorted name order: {name!r} after {self._last!r}")
        self._last = name
        t = t.detach().to("cpu").contiguous()
        self._h.update(name.encode())
        self._h.update(b"\0")
        self._h.update(str(t.dtype).encode())
        self._h.update(repr(tuple(t.shape)).encode())
        self._h.update(b"\0")
        if t.numel():
            self._h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def model_state_to_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (safe to ship to another actor)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
