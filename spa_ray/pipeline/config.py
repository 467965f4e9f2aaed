"""The run configuration: one documented dataclass tree.

Every field says what it means and its default, as TRL's ``DPOConfig`` does. Defaults
are the embedded task on one CPU machine; ``clusters/presets/`` holds the paper's
Mistral-7B/UltraFeedback setup. Placement (how many actors, their resources, which
share a device) is configuration here and never a separate code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from spa_ray.config.tree import (
    ConfigError,
    apply_overrides,
    field,
    from_dict,
    read_yaml,
    to_dict,
)
from spa_ray.config.placement import ActorGroup, PlacementConfig, WeightSyncConfig
from spa_ray.variants.config import VariantConfig


@dataclass
class RunConfig:
    name: str = field("embedded-default", help="Run name; the run directory is <root>/<name>.")
    root: str = field("runs", help="Folder holding run directories.")
    seed: int = field(0, help="Seed for data splits, sampling and training (the data seed).")
    iterations: int = field(2, help="SPA iterations T after the seed stage (paper: 3).")
    start_from: str = field(
        "", help="A finished run directory whose stages up to pi_0 this run copies instead of redoing; the "
        "configs may differ only in iteration settings (judge, refinement, iterations). Empty: none."
    )

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", "..") or ".." in self.name:
            raise ConfigError(f"run.name: {self.name!r} must be a plain folder name (no '/', no '..')")
        if self.iterations < 0:
            raise ConfigError(f"run.iterations: must be >= 0, got {self.iterations}")


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = field(
        None, help="SFT model pi_init: a hub id or local folder. None builds/uses the embedded task's tiny model."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="Weights dtype; auto = the checkpoint's own dtype (as transformers' dtype='auto'): set bfloat16 on GPUs."
    )
    trust_remote_code: bool = field(False, help="Allow model repos to run their own Python code. Off unless asked.")
    max_prompt_len: int = field(1024, help="Prompt tokens kept (truncated from the left).")
    max_total_len: int = field(2048, help="Prompt + response tokens kept (response truncated from the right).")

    def __post_init__(self) -> None:
        if self.max_prompt_len < 1 or self.max_total_len <= self.max_prompt_len:
            raise ConfigError(
                f"model.max_total_len ({self.max_total_len}) must exceed model.max_prompt_len ({self.max_prompt_len}) >= 1"
            )


@dataclass
class DataConfig:
    task: str = field(
        "spa_ray.tasks.embedded:EmbeddedTask",
        help="Task import path 'pkg.module:Class' (prompts, seed pairs, gold judge for evaluation).",
    )
    task_kwargs: dict = field(
        default_factory=dict,
        help="Keyword arguments for the task's constructor (split sizes such as seed_fraction live here).",
    )
    judge_holdout_fraction: float = field(
        0.1, help="Fraction of the seed's gold pairs kept out of training to check the judge each iteration."
    )
    gold_pairs: Literal["seed", "all"] = field(
        "seed",
        help="Prompts whose gold pairs train the seed stage: the seed set X0 (SPA), or every non-evaluation prompt "
        "(the 'DPO on 100%' baseline; needs run.iterations=0).",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.judge_holdout_fraction < 1.0:
            raise ConfigError(f"data.judge_holdout_fraction: must be in [0, 1), got {self.judge_holdout_fraction}")


@dataclass
class GenerationConfig:
    backend: Literal["transformers", "vllm"] = field(
        "transformers", help="Generator engine: transformers generate (CPU/GPU) or vLLM (GPU, extra 'gpu')."
    )
    responses_per_prompt: int = field(2, help="Samples per prompt (SPA labels a pair: 2).")
    temperature: float = field(0.7, help="Sampling temperature.")
    top_p: float = field(1.0, help="Nucleus sampling mass.")
    max_new_tokens: int = field(300, help="Most new tokens per response; EOS stops earlier.")
    batch_size: int = field(64, help="Prompts per generate call (transformers backend).")
    tensor_parallel_size: int = field(1, help="vLLM tensor parallel degree per generator actor.")
    gpu_memory_utilization: float = field(0.85, help="vLLM's share of its GPU(s); lower it when colocating.")
    engine_kwargs: dict = field(
        default_factory=dict,
        help="More vllm.LLM arguments, e.g. {max_num_seqs: 128, kv_cache_memory_bytes: 2147483648}; on CPU the "
        "defaults are {enforce_eager: true, kv_cache_memory_bytes: 1 GiB}.",
    )

    def __post_init__(self) -> None:
        if self.responses_per_prompt < 2:
            raise ConfigError(f"generation.responses_per_prompt: must be >= 2, got {self.responses_per_prompt}")
        if self.temperature <= 0:
            raise ConfigError(f"generation.temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"generation.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass
class JudgeConfig:
    kind: Literal["implicit_reward", "reward_model", "llm_as_judge"] = field(
        "implicit_reward",
        help="Who labels pairs: SPA's implicit reward; or, as the paper's baselines (set training.self_refine=false), "
        "an external scalar reward model or LLM-as-judge (A)/(B), each trained once per run (judge.model_*).",
    )
    reference: Literal["init", "previous", "none"] = field(
        "init", help="Judge reference: pi_init (paper default), the model before pi_{t-1}, or none (raw likelihood)."
    )
    beta: float = field(0.1, help="beta in r = beta*log(pi_{t-1}/pi_ref) (Eq. 7).")
    length_penalty: float = field(0.0, help="a in r - a*|y| (Eq. 13); 0 disables it. Paper range 0.001-0.01.")
    reuse_generator_logprobs: bool = field(
        False,
        help="Skip the judge's pi_{t-1} forward and use the generator's log-probs. Off: tempered sampling "
        "log-probs and engine numerics differ from teacher-forced log pi.",
    )
    max_tokens_per_batch: int = field(8192, help="Token budget of one length-bucketed judge forward.")
    stream: bool = field(
        True,
        help="Label each shard of pairs as soon as its samples exist, while generation goes on (implicit_reward "
        "only); the labels equal those of labelling after generation.",
    )
    on_trainer: bool = field(
        False,
        help="Run the judge's forwards on the trainer group's workers (they hold pi_{t-1} between stages; pi_init is "
        "read once per iteration) instead of judge actors: no judge pool, its GPUs go to generation. Implicit "
        "reward only; labels are then made after generation (no judge.stream).",
    )
    health_floor: float = field(
        0.0, help="Stop before an iteration if the judge's accuracy on held-out gold seed pairs is below this (0: the "
        "figure is recorded only; off-policy, it missed a collapse the label audit catches: audit.floor)."
    )
    pair_rule: Literal["first_two", "max_min"] = field(
        "first_two",
        help="Which pair of a prompt's samples is labelled: the first two (paper), or the highest against the lowest "
        "implicit reward of all generation.responses_per_prompt samples (as DICE does; implicit_reward only).",
    )
    keep_fraction: float = field(
        0.25, help="Confidence filter: train on this top fraction of an iteration's pairs by |reward margin| (1: all, "
        "the paper). 0.25 is the setting that beat its own pi_0 in the grid (docs/results.md, issue #21). Every "
        "judged pair, its margin and whether it was kept: data/iter_t/pairs/judged.parquet.",
    )
    min_margin: float = field(0.0, help="Confidence filter: drop pairs whose |reward margin| is below this (0: none).")
    keep_by: Literal["margin", "random"] = field(
        "margin", help="Confidence filter: margin keeps the largest |reward margin|s; random keeps as many pairs at "
        "random, a control that trains on as few pairs without the judge's confidence.",
    )
    model_pairs: int = field(
        4000,
        help="judge.kind=reward_model: gold pairs of the task's demonstrations (prompts outside the seed, iteration "
        "and evaluation sets) its scorer is trained on. Ours; PairRM saw ~500K pairs of other data.",
    )
    model_epochs: Optional[int] = field(
        None, help="Epochs of training the judge model; None: 1 (reward model), 3 (LLM judge, the paper's)."
    )
    model_learning_rate: float = field(
        5e-4, help="AdamW lr of training the judge model (ours for the tiny model; paper, 7B LLM judge: 2e-5)."
    )
    model_batch_size: int = field(32, help="Pairs (reward model) or questions (LLM judge) per judge-model step.")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"judge.beta: must be > 0, got {self.beta}")
        if self.model_pairs < 1 or self.model_batch_size < 1 or (self.model_epochs is not None and self.model_epochs < 1):
            raise ConfigError("judge.model_pairs, judge.model_batch_size and judge.model_epochs must be >= 1")
        if self.model_learning_rate <= 0:
            raise ConfigError(f"judge.model_learning_rate: must be > 0, got {self.model_learning_rate}")
        if self.length_penalty < 0:
            raise ConfigError(f"judge.length_penalty: must be >= 0, got {self.length_penalty}")
        if not 0 <= self.health_floor <= 1:
            raise ConfigError(f"judge.health_floor: must be in [0, 1], got {self.health_floor}")
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"judge.keep_fraction: must be in (0, 1], got {self.keep_fraction}")
        if self.min_margin < 0:
            raise ConfigError(f"judge.min_margin: must be >= 0, got {self.min_margin}")
        if self.on_trainer and self.kind != "implicit_reward":
            raise ConfigError(f"judge.on_trainer needs judge.kind=implicit_reward (the trainer holds pi_{{t-1}}), "
                              f"got judge.kind={self.kind}")
        if self.pair_rule != "first_two" and self.kind != "implicit_reward":
            raise ConfigError(f"judge.pair_rule={self.pair_rule} needs judge.kind=implicit_reward (a reward for each "
                              f"sample); judge.kind={self.kind} labels the first two samples")


@dataclass
class TrainingConfig:
    beta: float = field(0.1, help="DPO temperature beta (Eq. 5).")
    learning_rate: float = field(
        1e-5,
        help="AdamW learning rate (paper, 7B: 5e-7). Embedded tiny model: 1e-5, the reproduction grid's, where the "
        "seed DPO moves the policy (3e-6 barely does: pi_0 0.502 vs SFT 0.499) and, with judge.keep_fraction=0.25, "
        "the iterations add to pi_0 (docs/results.md); 1e-4 collapses the judge (the label audit stops it).",
    )
    weight_decay: float = field(0.0, help="AdamW weight decay.")
    warmup_ratio: float = field(0.1, help="Cosine schedule warm-up as a fraction of steps.")
    global_batch_size: int = field(32, help="Pairs per optimizer step, across workers and accumulation.")
    micro_batch_size: int = field(8, help="Pairs per worker forward; accumulation fills the global batch.")
    seed_epochs: int = field(3, help="Epochs of DPO on the seed set D0.")
    iteration_epochs: int = field(1, help="Epochs of refined DPO per iteration.")
    max_grad_norm: float = field(1.0, help="Gradient clipping norm (0 disables).")
    self_refine: bool = field(True, help="Label smoothing on flagged pairs (Eq. 9-10). Off = data expansion only.")
    decoupled_noise_detection: bool = field(
        True, help="Flag noise with the extrapolated model (Eq. 11-12) instead of pi_theta itself."
    )
    alpha: float = field(0.1, help="Label smoothing strength on flagged pairs (Eq. 10).")
    k_percent: float = field(10.0, help="Flag the least confident K% of pairs (Eq. 9).")
    confidence_window: int = field(50, help="Recent confidences (all ranks) the K% threshold is taken over.")
    denoise_warmup: float = field(0.2, help="Fraction of an iteration's steps with z = 0 while the window fills.")
    lambda_first: float = field(0.5, help="Extrapolation lambda of iteration 1; halved each iteration.")
    zero_stage: int = field(2, help="DeepSpeed ZeRO stage (0-3).")
    deepspeed: dict = field(
        default_factory=dict,
        help="Extra DeepSpeed config merged over the run's, e.g. {zero_optimization: {reduce_bucket_size: 5.0e+7}}; "
        "batch sizes, stage, clipping, precision, optimizer and schedule come from the settings above (refused here).",
    )
    noise_chunk_size: int = field(128, help="Sequence chunk for extrapolated log-probs (memory bound).")
    checkpoint_every: int = field(
        0, help="Optimizer steps between step checkpoints a failed trainer worker resumes from (0: none)."
    )
    seed_replay: float = field(
        0.0, help="Share of each iteration's training pairs drawn from the gold seed pairs D0 (0: none, the paper), "
        "so that gold labels keep anchoring the self-labelled loop; column source in pairs.parquet says which is which."
    )

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"training.beta: must be > 0, got {self.beta}")
        if self.learning_rate <= 0:
            raise ConfigError(f"training.learning_rate: must be > 0, got {self.learning_rate}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"training.alpha: must be in [0, 1], got {self.alpha}")
        if not 0 < self.k_percent < 100:
            raise ConfigError(f"training.k_percent: must be in (0, 100), got {self.k_percent}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"training.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.denoise_warmup < 1:
            raise ConfigError(f"training.denoise_warmup: must be in [0, 1), got {self.denoise_warmup}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"training.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        from spa_ray.training.deepspeed_config import check_extra_deepspeed

        try:
            check_extra_deepspeed(self.deepspeed)
        except ValueError as exc:
            raise ConfigError(f"training.deepspeed: {exc}") from None
        if self.micro_batch_size < 1 or self.global_batch_size < self.micro_batch_size:
            raise ConfigError(
                f"training.global_batch_size ({self.global_batch_size}) must be >= "
                f"training.micro_batch_size ({self.micro_batch_size}) >= 1"
            )
        if self.confidence_window < 1:
            raise ConfigError(f"training.confidence_window: must be >= 1, got {self.confidence_window}")
        if self.lambda_first < 0:
            raise ConfigError(f"training.lambda_first: must be >= 0, got {self.lambda_first}")
        if not 0 <= self.seed_replay < 1:
            raise ConfigError(f"training.seed_replay: must be in [0, 1), got {self.seed_replay}")


@dataclass
class AuditConfig:
    pairs: int = field(
        200, help="Self-labelled pairs per iteration, drawn from all judged pairs, sent to the auditor and kept out "
        "of training (0: no audit); at most a quarter of the judged pairs, so that a small run still trains. On the "
        "embedded task ~40% are gold ties, so 200 give ~120 decided pairs: a 95% interval of about +-0.09. The stop "
        "rule reads them all (the judge's labels); those the filter kept are reported beside (kept_agreement)."
    )
    auditor: str = field(
        "gold",
        help="Who labels the audited pairs: gold (the task's gold judge), file (the run writes data/iter_t/audit/"
        "request.jsonl and waits for labels.jsonl), or module:function (called with prompts, chosen, rejected; "
        "returns per pair True = agrees, False = prefers the rejected, None = cannot tell).",
    )
    floor: float = field(
        0.5, help="Stop the run, before pi_t is trained, when the audited agreement's 95% interval lies wholly below "
        "this (0.5: labels worse than a coin; lr 1e-4 on the embedded model reads 0.34-0.38, healthy runs 0.6-0.7)."
    )
    wait_s: float = field(86400.0, help="auditor=file: how long to wait for labels.jsonl before stopping.")

    def __post_init__(self) -> None:
        if self.pairs < 0:
            raise ConfigError(f"audit.pairs: must be >= 0, got {self.pairs}")
        if not 0 <= self.floor <= 1:
            raise ConfigError(f"audit.floor: must be in [0, 1], got {self.floor}")
        if self.auditor not in ("gold", "file") and ":" not in self.auditor:
            raise ConfigError(f"audit.auditor: gold, file or module:function, got {self.auditor!r}")


@dataclass
class EvaluationConfig:
    num_prompts: int = field(200, help="Held-out prompts scored by the gold judge per evaluation.")
    samples_per_prompt: int = field(2, help="Policy samples per evaluation prompt.")
    alpaca_eval_json: bool = field(True, help="Also write responses in AlpacaEval's JSON format.")


@dataclass
class SPAConfig:
    run: RunConfig = field(default_factory=RunConfig, help="Run identity and loop length.")
    model: ModelConfig = field(default_factory=ModelConfig, help="The SFT model pi_init.")
    data: DataConfig = field(default_factory=DataConfig, help="Task and data splits.")
    generation: GenerationConfig = field(default_factory=GenerationConfig, help="Sampling of responses.")
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="Labelling of pairs.")
    training: TrainingConfig = field(default_factory=TrainingConfig, help="Seed DPO and refined DPO.")
    placement: PlacementConfig = field(default_factory=PlacementConfig, help="Actors and their resources.")
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig, help="Broadcast of new weights.")
    audit: AuditConfig = field(
        default_factory=AuditConfig, help="On-policy label audit: the stop rule of self-labelling (issue #21)."
    )
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, help="Gold-judge evaluation.")
    variant: VariantConfig = field(
        default_factory=VariantConfig, help="Seed method beside SPA (SSPO, SP2DPO, S-SPPO, WDRO-DPO); README 'Variants'."
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


#: settings a resumed run may change: where and in what memory things run, never what they
#: compute (OOM on resume -> lower a memory fraction, add offload, move to other nodes).
#: placement.trainer.count is not here: a stage's step checkpoints are per rank.
RESOURCE_SETTINGS = frozenset({
    "placement.generators", "placement.judges", "placement.trainer.num_cpus", "placement.trainer.num_gpus",
    "placement.trainer.resources", "placement.trainer.threads", "placement.ray_address",
    "weight_sync",
    "generation.gpu_memory_utilization", "generation.tensor_parallel_size", "generation.engine_kwargs",
    "judge.max_tokens_per_batch", "judge.stream",
    "training.noise_chunk_size", "training.checkpoint_every", "training.deepspeed",
})


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SPAConfig:
    """Defaults, then the YAML file (if any), then ``key.sub=value`` overrides."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return from_dict(SPAConfig, data, source=str(path) if path else "overrides")


def config_to_dict(config: SPAConfig) -> dict[str, Any]:
    return to_dict(config)


__all__ = [
    "ActorGroup",
    "AuditConfig",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "GenerationConfig",
    "JudgeConfig",
    "ModelConfig",
    "PlacementConfig",
    "RunConfig",
    "SPAConfig",
    "TrainingConfig",
    "WeightSyncConfig",
    "config_to_dict",
    "load_config",
]
