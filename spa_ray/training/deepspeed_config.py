"""The DeepSpeed config of a training stage: what the run owns, plus the user's extras.

The run derives batch sizes, accumulation, ZeRO stage, clipping and precision from its own
settings (``training.*``, ``model.dtype``) and builds the optimizer and schedule itself, so
those keys are refused in ``training.deepspeed``; everything else a DeepSpeed user tunes
(gradient bucket sizes, CPU offload, ZeRO-3 prefetch and persistence thresholds,
communication dtype) is merged over the generated config as given. Pure dicts: no
DeepSpeed import, so the checks run when the config is loaded, before any worker starts.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["OWNED_KEYS", "check_extra_deepspeed", "stage_deepspeed_config", "reference_deepspeed_config"]

#: DeepSpeed keys the run sets itself -> the setting that controls them
OWNED_KEYS: dict[str, str] = {
    "train_batch_size": "training.global_batch_size",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.global_batch_size / training.micro_batch_size",
    "zero_optimization.stage": "training.zero_stage",
    "gradient_clipping": "training.max_grad_norm",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "optimizer": "training.learning_rate / training.weight_decay (the run builds AdamW)",
    "scheduler": "training.warmup_ratio (the run builds the cosine schedule)",
}


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, key + ".")
    return keys


def check_extra_deepspeed(extra: dict[str, Any]) -> None:
    """Raise ValueError naming the first key of ``extra`` the run owns, or a non-dict section."""
    if not isinstance(extra, dict):
        raise ValueError(f"must be a mapping of DeepSpeed config keys, got {type(extra).__name__}")
    for key in _dotted_keys(extra):
        if key in OWNED_KEYS:
            raise ValueError(f"{key} is set by the run from {OWNED_KEYS[key]}; set that instead")
    zero = extra.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"zero_optimization must be a mapping, got {type(zero).__name__}")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, section by section (a new copy; neither input changes)."""
    out = copy.deepcopy(base)
    for name, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = _merge(out[name], value)
        else:
            out[name] = copy.deepcopy(value)
    return out


def stage_deepspeed_config(
    *,
    global_batch_size: int,
    micro_batch_size: int,
    accumulation_steps: int,
    zero_stage: int,
    max_grad_norm: float,
    use_bf16: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The policy engine's config: the run's keys, then ``extra`` (``training.deepspeed``) merged over."""
    config: dict[str, Any] = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if max_grad_norm > 0:
        config["gradient_clipping"] = max_grad_norm
    if use_bf16:
        config["bf16"] = {"enabled": True}
    if extra:
        check_extra_deepspeed(extra)
        config = _merge(config, extra)
    return config


def reference_deepspeed_config(policy_config: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-3 config of the frozen reference: the policy's parameter settings, no optimizer state
    (so ``offload_optimizer`` is dropped and ``offload_param`` kept)."""
    zero = {k: v for k, v in policy_config["zero_optimization"].items() if k != "offload_optimizer"}
    zero["stage"] = 3
    return {
        "train_micro_batch_size_per_gpu": policy_config["train_micro_batch_size_per_gpu"],
        "zero_optimization": zero,
        "bf16": {"enabled": bool(policy_config.get("bf16", {}).get("enabled", False))},
    }
