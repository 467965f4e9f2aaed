"""The per-worker side of the trainer group: a command loop, and one stage of (refined) DPO.

``trainer_group_loop`` runs on every rank of the job's one Ray Train ``fit()``: it waits
for stage commands from the driver (``StageMailbox``), runs each with ``run_stage`` and
keeps the weights it saved in memory (``WarmWeights``), so the next stage -- whose init
and reference are those weights, pi_{t-1} -- starts without reading them back from disk.

``run_stage`` holds the policy under DeepSpeed ZeRO (stage by config; gloo on CPU, NCCL
on GPU) and a frozen reference, each stage with a fresh optimizer, schedule and engine.
The loss itself is ``preference_step`` (pure torch); this file only adds what
distribution needs: the data plan by rank, the confidence window gathered across ranks,
gradient accumulation, step checkpoints that carry the optimizer, scheduler, window, RNG
and data position (tagged with their command, so a stage never resumes from another
stage's), and the final Hugging Face folder gathered from ZeRO shards by rank 0, which
rank 0 also publishes to Ray's object store (``WeightsHandle``).
"""

from __future__ import annotations

import gc
import importlib
import itertools
import json
import math
import os
import random
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from spa_ray.objectives._checks import NonFiniteValuesError
from spa_ray.objectives.confidence_window import ConfidenceWindow
from spa_ray.objectives.distributed import all_gather_1d
from spa_ray.training.batch_plan import BatchPlan, group_by_length
from spa_ray.training.deepspeed_config import reference_deepspeed_config, stage_deepspeed_config
from spa_ray.training.extension_locks import StaleLockWatchdog
from spa_ray.training.pairs_table import read_pairs
from spa_ray.training.preference_step import preference_step


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss: the stage stops; the previous checkpoint stays intact."""


@dataclass
class TrainStageSpec:
    """Everything one training stage needs; plain data so it crosses to the workers."""

    stage: str
    policy_path: str
    reference_path: str
    pairs_path: str
    output_dir: str
    epochs: int
    refine: bool
    lam: float
    seed: int
    beta: float = 0.1
    alpha: float = 0.1
    k_percent: float = 10.0
    confidence_window: int = 50
    denoise_warmup: float = 0.2
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    global_batch_size: int = 32
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    zero_stage: int = 2
    deepspeed: dict | None = None  # training.deepspeed: extra DeepSpeed keys merged over the run's
    dtype: str = "auto"
    noise_chunk_size: int = 128
    checkpoint_every: int = 0
    trust_remote_code: bool = False
    variant: dict | None = None  # resolved by spa_ray.variants.stage; None = SPA (README "Variants")
    fail_at_step: int = -1  # tests only: the last rank raises once at this step (fault injection)
    # the weights the driver knows this group holds in memory (their checksum): a rank whose
    # warm weights match builds the model from them instead of reading the folder
    policy_checksum: str | None = None
    reference_checksum: str | None = None
    command: str = ""  # set by the trainer group: tags step checkpoints with their stage command

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rng_state() -> dict[str, Any]:
    """Every generator a resumed step must continue: CPU torch, Python, and this rank's GPU."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _stop_on_nonfinite(marker: Path, stage: str, step: int, rank: int, what: str, detail: str = "",
                       check: str = "the pairs table") -> None:
    """Raise NonFiniteLossError, leaving a marker so Ray Train's restarts stop at once too."""
    message = (f"stage {stage}: {what} at step {step} (rank {rank}){detail}; stopping: the previous checkpoint "
               f"is left as it was. Lower training.learning_rate or check {check}.")
    marker.write_text(message, encoding="utf-8")
    raise NonFiniteLossError(message) from None


@dataclass
class WarmWeights:
    """What one rank keeps between stages: the last weights it saved, as published."""

    checksum: str | None = None
    ref: Any = None              # ObjectRef of the PackedStateDict rank 0 put (see WeightsHandle)
    model_class: Any = None
    model_config: Any = None
    tokenizer: Any = None

    def model(self, checksum: str | None, dtype: str, device: Any):
        """A fresh model holding the warm weights, or None when ``checksum`` is not theirs."""
        if checksum is None or checksum != self.checksum or self.model_class is None:
            return None
        import ray

        from spa_ray.models.loading import build_causal_lm
        from spa_ray.weights.packing import unpack_state_dict

        try:
            state = unpack_state_dict(ray.get(self.ref, timeout=600))
        except Exception:  # e.g. the owner (an earlier rank 0) is gone: read the folder instead
            return None
        return build_causal_lm(self.model_class, self.model_config, state, dtype=dtype, device=device)


@dataclass
class StageContext:
    rank: int
    world: int
    device: Any
    warm: WarmWeights = field(default_factory=WarmWeights)
    judge_models: dict = field(default_factory=dict)  # "policy"/"reference" -> (key, model), between stages


def trainer_group_loop(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker for the whole job: run stage commands until stopped.

    ``config``: {"mailbox": StageMailbox handle, "token": this group's id}. A rank never
    waits inside a collective between stages (it polls the mailbox), so idle time is
    not bounded by the process group's timeout.
    """
    import ray
    import ray.train

    mailbox, token = config["mailbox"], config["token"]
    if config.get("threads"):  # placement.trainer.threads: more than Ray's OMP_NUM_THREADS (its CPUs)
        torch.set_num_threads(int(config["threads"]))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    ctx = StageContext(rank, world, device)
    group = _from_rank0(ray.get(mailbox.group_started.remote()) if rank == 0 else None, world)
    after = -1
    for step in itertools.count():
        if rank == 0:  # rank 0 decides; the others follow its decision, never their own reads
            command = None
            while command is None:
                command = ray.get(mailbox.next_command.remote(after))
            decision = {"command": command, "proceed": command["kind"] != "stop"
                        and ray.get(mailbox.begin.remote(command["id"]))}
            ray.get(mailbox.assign.remote(group, step, decision))
        else:
            decision = None
            while decision is None:
                decision = ray.get(mailbox.assignment.remote(group, step))
        command = decision["command"]
        if command["kind"] == "stop":
            return
        after = command["id"]
        if not decision["proceed"]:  # failed: its budget is spent
            continue
        try:
            if command["kind"] == "warm":
                outcome = warm_up(command["payload"], ctx)  # never raises: a miss only means a folder read later
            elif command["kind"] == "label":
                outcome = label_on_rank(command["payload"], ctx)
            else:
                outcome = run_stage(TrainStageSpec(**{**command["payload"], "command": f"{token}/{command['id']}"}), ctx)
        except BaseException as exc:
            fatal = isinstance(exc, NonFiniteLossError)
            detail = str(exc) if fatal else "".join(traceback.format_exception(exc))[-4000:]
            ray.get(mailbox.fail.remote(command["id"], rank, detail, fatal=fatal))
            raise
        if rank == 0:
            ray.get(mailbox.complete.remote(command["id"], outcome))
            handle = outcome.get("weights")
        else:  # the ref arrives through the mailbox, so that Ray counts this rank as a borrower
            result = ray.get(mailbox.wait_result.remote(command["id"], 600.0))
            handle = result.get("outcome", {}).get("weights")
        if handle is not None:
            ctx.warm.checksum, ctx.warm.ref = handle.checksum, handle.ref


def _from_rank0(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank (a broadcast in the group's process group)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def warm_up(payload: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Hold the weights at ``payload["path"]`` (the next stage's pi_{t-1}) the way a stage
    leaves pi_t, so that the job's first stage builds from memory too; and pay the
    imports a first stage would pay. Runs while the group would otherwise wait (the
    driver is still evaluating). Rank 0 reads the files and publishes them; every rank
    resolves the model class and tokenizer. Any error leaves the ranks cold, not failed."""
    started = time.perf_counter()
    try:
        importlib.import_module("deepspeed")  # the import a first stage pays (~1 s)
        _build_deepspeed_ops()
        from transformers import AutoConfig, AutoModelForCausalLM

        from spa_ray.models.loading import load_checkpoint_state_dict, load_tokenizer

        path, trust = payload["path"], bool(payload.get("trust_remote_code", False))
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        with torch.device("meta"):  # the class only: no memory for weights
            model_class = type(AutoModelForCausalLM.from_config(config, trust_remote_code=trust))
        tokenizer = load_tokenizer(path, trust_remote_code=trust, require_chat_template=False)
        outcome: dict[str, Any] = {}
        if ctx.rank == 0:
            from spa_ray.weights.handle import publish_state_dict

            outcome["weights"] = publish_state_dict(load_checkpoint_state_dict(path))
        ctx.warm = WarmWeights(model_class=model_class, model_config=config, tokenizer=tokenizer)
    except Exception as exc:  # e.g. a hub id (no local folder): the stage reads it itself
        ctx.warm = WarmWeights()
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    outcome.update(seconds=time.perf_counter() - started, pid=os.getpid())
    return outcome


def label_on_rank(payload: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """The judge's forwards on the trainer's ranks (``judge.on_trainer``): every rank labels
    its share of the rows (Eq. 7-8, ``judging.pair_labels``) with pi_{t-1} -- built from the
    ranks' warm weights when the payload names their checksum, else read from its folder --
    against the judge reference (read once, kept until the next stage); rank 0 gathers the
    labels in row order. The models are dropped when the next stage starts."""
    import ray

    from spa_ray.judging.pair_labels import label_pair_rows
    from spa_ray.models.loading import load_causal_lm, load_tokenizer

    dtype, trust = payload["dtype"], bool(payload.get("trust_remote_code", False))

    def cached(slot: str, key: Any, build):
        held = ctx.judge_models.get(slot)
        if held is None or held[0] != key:
            ctx.judge_models.pop(slot, None)
            gc.collect()
            ctx.judge_models[slot] = (key, build())
        return ctx.judge_models[slot][1]

    checksum, path = payload.get("policy_checksum"), payload["policy_path"]

    def build_policy():
        model = ctx.warm.model(checksum, dtype, ctx.device)  # None unless the ranks hold these weights
        return model if model is not None else load_causal_lm(path, dtype=dtype, device=ctx.device,
                                                              trust_remote_code=trust)

    policy = cached("policy", checksum or path, build_policy)
    reference_path = payload.get("reference_path")
    reference = None if reference_path is None else cached(
        "reference", reference_path, lambda: load_causal_lm(reference_path, dtype=dtype, device=ctx.device,
                                                            trust_remote_code=trust))
    tokenizer = cached("tokenizer", path, lambda: ctx.warm.tokenizer if checksum and ctx.warm.checksum == checksum
                       and ctx.warm.tokenizer is not None
                       else load_tokenizer(path, trust_remote_code=trust, require_chat_template=False))
    rows = ray.get(payload["rows"], timeout=600)
    mine = list(range(ctx.rank, len(rows), ctx.world))
    with torch.no_grad():
        labels = label_pair_rows(policy, reference, [rows[i] for i in mine], pad_token_id=tokenizer.pad_token_id,
                                 beta=payload["beta"], length_penalty=payload["length_penalty"],
                                 max_tokens_per_batch=payload["max_tokens_per_batch"], version=payload.get("version"))
    parts = [(mine, labels)]
    if ctx.world > 1:
        import torch.distributed as dist

        parts = [None] * ctx.world
        dist.all_gather_object(parts, (mine, labels))
    if ctx.rank != 0:
        return {}
    ordered: list[Any] = [None] * len(rows)
    for indices, part in parts:
        for i, label in zip(indices, part):
            ordered[i] = label
    return {"labels": ordered}


def _build_deepspeed_ops() -> None:
    """Build (once per machine; later: load) the op ``deepspeed.initialize`` would build first:
    on CPU its shared-memory collective, ~30-60 s of g++ on a fresh machine."""
    watchdog = StaleLockWatchdog().start()
    try:
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()  # None where the accelerator has no such op (GPUs)
    finally:
        watchdog.stop()


def run_stage(spec: TrainStageSpec, ctx: StageContext) -> dict[str, Any]:
    """One training stage on this rank; rank 0 returns the outcome (weights handle, timings)."""
    # DeepSpeed may build an op below; a lock left by a killed build must not block it forever
    lock_watchdog = StaleLockWatchdog().start()
    import deepspeed
    import ray.train
    from transformers import get_cosine_schedule_with_warmup

    from spa_ray.data.collate import collate_preference_pairs
    from spa_ray.data.tokenize import TokenizedPair, TokenizedSequence
    from spa_ray.models.loading import load_causal_lm, load_tokenizer

    started = time.perf_counter()
    rank, world, device = ctx.rank, ctx.world, ctx.device
    nonfinite_marker = Path(spec.output_dir) / ".nonfinite_loss"
    if nonfinite_marker.exists():  # a restart after a NaN/inf would only meet it again
        raise NonFiniteLossError(nonfinite_marker.read_text(encoding="utf-8"))

    ctx.judge_models.clear()  # judge.on_trainer's models: the stage needs the memory
    gc.collect()
    warm = ctx.warm
    policy = warm.model(spec.policy_checksum, spec.dtype, device)
    from_memory = policy is not None
    if from_memory:
        tokenizer = warm.tokenizer
    else:
        tokenizer = load_tokenizer(spec.policy_path, trust_remote_code=spec.trust_remote_code,
                                   require_chat_template=False)
        policy = load_causal_lm(spec.policy_path, dtype=spec.dtype, device=device,
                                trust_remote_code=spec.trust_remote_code)
    reference = warm.model(spec.reference_checksum, spec.dtype, device)
    if reference is None:
        reference = load_causal_lm(
            spec.reference_path, dtype=spec.dtype, device=device, trust_remote_code=spec.trust_remote_code
        )
    # the warm weights are now held by the new models; the next stage publishes its own
    ctx.warm = WarmWeights()
    gc.collect()
    # seeded after the models exist: building from memory and from disk leave the RNG alike
    torch.manual_seed(spec.seed * 7919 + rank)
    random.seed(spec.seed * 7919 + rank)
    reference.requires_grad_(False)
    policy.train()
    use_bf16 = next(policy.parameters()).dtype == torch.bfloat16
    models_seconds = time.perf_counter() - started

    table = read_pairs(spec.pairs_path)
    plan = BatchPlan(
        num_pairs=len(table["prompt_ids"]),
        global_batch_size=spec.global_batch_size,
        micro_batch_size=spec.micro_batch_size,
        world_size=world,
        epochs=spec.epochs,
        seed=spec.seed,
    )

    pair_lengths = [
        len(p) + max(len(c), len(r)) for p, c, r in zip(table["prompt_ids"], table["chosen_ids"], table["rejected_ids"])
    ]

    def pair_at(i: int) -> TokenizedPair:
        prompt = [int(t) for t in table["prompt_ids"][i]]
        sides = {}
        for side in ("chosen", "rejected"):
            response = [int(t) for t in table[f"{side}_ids"][i]]
            ids = prompt + response
            sides[side] = TokenizedSequence(
                input_ids=ids,
                attention_mask=[1] * len(ids),
                response_mask=[False] * len(prompt) + [True] * len(response),
                prompt_len=len(prompt),
                response_len=len(response),
            )
        return TokenizedPair(**sides)

    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(spec.warmup_ratio * plan.total_steps), num_training_steps=plan.total_steps
    )
    ds_config = stage_deepspeed_config(
        global_batch_size=spec.global_batch_size,
        micro_batch_size=spec.micro_batch_size,
        accumulation_steps=plan.accumulation_steps,
        zero_stage=spec.zero_stage,
        max_grad_norm=spec.max_grad_norm,
        use_bf16=use_bf16,
        extra=spec.deepspeed,
    )
    if rank == 0:  # what this stage ran with, beside its outputs
        Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(spec.output_dir) / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1), encoding="utf-8")
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if spec.zero_stage == 3:  # shard the frozen reference too, as TRL does under ZeRO-3
        reference, *_ = deepspeed.initialize(
            model=reference, config=reference_deepspeed_config(ds_config), dist_init_required=False
        )
    lock_watchdog.stop()
    reference.eval()
    setup_seconds = time.perf_counter() - started - models_seconds
    step_seconds = 0.0

    window = ConfidenceWindow(
        size=spec.confidence_window,
        k_percent=spec.k_percent,
        warmup_fraction=spec.denoise_warmup,
        gather=all_gather_1d if world > 1 else None,
    )
    variant = None
    if spec.variant is not None:
        from spa_ray.variants.training import TrainVariant

        variant = TrainVariant(spec.variant, table, seed=spec.seed, rank=rank, micro_batch_size=spec.micro_batch_size,
                               gather=all_gather_1d if world > 1 else None)

    start_step = 0
    restored = _own_step_checkpoint(spec)
    if restored is not None:
        with restored.as_directory() as ckpt_dir:
            _, client = engine.load_checkpoint(ckpt_dir, tag="latest_step")
            start_step = int(client["next_step"])
            window.load_state_dict(client["window"])
            if variant is not None and "variant" in client:
                variant.load_state_dict(client["variant"])
            saved = torch.load(Path(ckpt_dir) / f"rng_rank{rank}.pt", weights_only=True)
            _set_rng_state(saved)

    log_path = Path(spec.output_dir) / "train_log.jsonl"
    flags_rows: list[tuple[int, int, float, float]] = []  # (pair index, epoch, confidence, z)
    if restored is not None:
        flags_rows = [tuple(r) for r in saved.get("flags", [])]
        if rank == 0 and log_path.exists():  # steps >= start_step are redone: drop their lines
            kept = [x for x in log_path.read_text(encoding="utf-8").splitlines()
                    if x.strip() and json.loads(x)["step"] < start_step]
            log_path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    engine.train()
    progress = tqdm(
        total=plan.total_steps, initial=start_step, desc=spec.stage, unit="step", disable=rank != 0, mininterval=2.0
    )
    for step in range(start_step, plan.total_steps):
        t0 = time.time()
        if step == spec.fail_at_step and rank == world - 1:
            marker = Path(spec.output_dir) / f".fault_{spec.stage}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("injected")
                raise RuntimeError(f"injected worker failure at step {step}")
        step_stats: list[dict[str, float]] = []
        micro_batches = plan.micro_batches(step, rank)
        if variant is None:  # similar lengths per micro-batch: less padding (docs/performance.md)
            micro_batches = group_by_length(micro_batches, pair_lengths)
        for j, micro in enumerate(micro_batches):
            batch = collate_preference_pairs([pair_at(i) for i in micro], tokenizer.pad_token_id)
            if variant is not None:
                batch.update(variant.batch_extras(micro, step, j, tokenizer.pad_token_id))
            batch = {k: v.to(device) for k, v in batch.items()}
            try:
                out = preference_step(
                    engine,
                    reference,
                    batch,
                    beta=spec.beta,
                    refine=spec.refine,
                    alpha=spec.alpha,
                    lam=spec.lam,
                    window=window if spec.refine else None,
                    step=step,
                    total_steps=plan.total_steps,
                    chunk_size=spec.noise_chunk_size,
                    pad_token_id=tokenizer.pad_token_id,
                    objective=variant.objective if variant is not None else None,
                )
            except NonFiniteValuesError as exc:  # e.g. the confidence window refusing NaN confidences
                _stop_on_nonfinite(nonfinite_marker, spec.stage, step, rank, "non-finite values", f": {exc}")
            if not torch.isfinite(out.loss):
                _stop_on_nonfinite(nonfinite_marker, spec.stage, step, rank, f"non-finite loss {float(out.loss)}",
                                   check="the pairs table for empty responses")
            engine.backward(out.loss)
            engine.step()
            step_stats.append(out.stats)
            if out.z is not None:
                epoch = step // plan.steps_per_epoch
                for i, c, z in zip(micro, out.confidence.tolist(), out.z.tolist()):
                    flags_rows.append((i, epoch, float(c), float(z)))
        stats = {k: sum(s[k] for s in step_stats) / len(step_stats) for k in step_stats[0]}
        stats.update(step=step, lr=float(scheduler.get_last_lr()[0]), step_seconds=time.time() - t0)
        progress.update(1)
        progress.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
        if rank == 0:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"stage": spec.stage, **stats}) + "\n")
        if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0 and step + 1 < plan.total_steps:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(
                    tmp, tag="latest_step", client_state={"next_step": step + 1, "window": window.state_dict(),
                                  **({"variant": variant.state_dict()} if variant is not None else {})}
                )
                torch.save({**_rng_state(), "flags": flags_rows}, Path(tmp) / f"rng_rank{rank}.pt")
                (Path(tmp) / COMMAND_FILE).write_text(spec.command, encoding="utf-8")
                ray.train.report(stats, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        step_seconds += time.time() - t0

    progress.close()
    saving = time.perf_counter()
    _save_flags(spec, rank, world, flags_rows)
    state = _save_final_model(engine, tokenizer, spec, rank)
    outcome: dict[str, Any] = {}
    if rank == 0:
        from spa_ray.weights.handle import publish_state_dict

        outcome["weights"] = publish_state_dict(_as_saved(state, Path(spec.output_dir)))
    # what the next stage needs to build pi_t from memory; the tensors come from rank 0's handle
    ctx.warm = WarmWeights(model_class=type(engine.module), model_config=engine.module.config, tokenizer=tokenizer)
    del state, engine, optimizer, scheduler, reference, policy
    gc.collect()
    outcome.update(steps=plan.total_steps - start_step, step_seconds=step_seconds, models_seconds=models_seconds,
                   setup_seconds=setup_seconds, save_seconds=time.perf_counter() - saving,
                   seconds=time.perf_counter() - started, from_memory=from_memory, resumed_at_step=start_step,
                   pid=os.getpid(), threads=torch.get_num_threads())
    return outcome


COMMAND_FILE = "command.txt"


def _own_step_checkpoint(spec: TrainStageSpec):
    """The group's latest step checkpoint if this stage command wrote it, else None.

    In one long ``fit()`` Ray Train hands a restarted group its latest checkpoint, which
    may belong to an earlier stage: only this command's own is resumed from.
    """
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is None:
        return None
    with restored.as_directory() as folder:
        tag = Path(folder, COMMAND_FILE)
        mine = tag.exists() and tag.read_text(encoding="utf-8") == spec.command
    return restored if mine else None


def _as_saved(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """``state`` restricted to the tensors save_pretrained wrote (tied copies are dropped),
    checked against the files' headers: the published weights must be the checkpoint's."""
    from safetensors import safe_open

    from spa_ray.models.loading import _safetensors_files

    saved: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                meta = fh.get_slice(name)
                t = state.get(name)
                if t is None or list(t.shape) != list(meta.get_shape()) or _st_dtype(t.dtype) != meta.get_dtype():
                    raise RuntimeError(f"{f}: tensor {name!r} as saved differs from the trained model's "
                                       f"({None if t is None else (t.dtype, tuple(t.shape))}); not publishing it")
                saved[name] = t.detach().to("cpu")
    return saved


def _st_dtype(dtype: torch.dtype) -> str:
    """safetensors' dtype code for a torch dtype (F32, BF16, ...)."""
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}.get(dtype, str(dtype))


def _save_flags(spec: TrainStageSpec, rank: int, world: int, rows: list[tuple[int, int, float, float]]) -> None:
    """Every rank's per-pair confidences and z flags, gathered to rank 0 and written once."""
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if rank == 0 and rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        index, epoch, conf, z = zip(*sorted(rows))
        pq.write_table(
            pa.table({"pair_index": index, "epoch": epoch, "confidence": conf, "z": z}),
            str(Path(spec.output_dir) / "noise_flags.parquet"),
        )


def _save_final_model(engine: Any, tokenizer: Any, spec: TrainStageSpec, rank: int) -> dict[str, torch.Tensor]:
    """Gather ZeRO shards (all ranks take part) and let rank 0 write a safetensors HF folder,
    fsynced (the driver records the stage once this returns). Returns the state on rank 0."""
    from spa_ray.atomic_files import fsync_dir

    if spec.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if rank == 0:
        out = Path(spec.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = engine.module
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
        for f in out.iterdir():
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(out)
    return state
