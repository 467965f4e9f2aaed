"""The stages of Algorithm 1, each one resumable unit of work in the run directory.

A stage function first asks the ledger whether it already finished (then it only reads
its output back), otherwise it does the work into a temporary folder that the run
directory renames into place. Actors are created lazily and brought to the weights a
stage needs (version numbers: pi_init = 0, pi_t = t + 1) before it runs, so a resumed
run needs no special path.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from spa_ray.pipeline.config import RESOURCE_SETTINGS, ConfigError, SPAConfig, config_to_dict, load_config
from spa_ray.config.tree import differing_keys, get_dotted
from spa_ray.pipeline.run_dir import RunDirectory
from spa_ray.data.tables import read_json, read_parquet, write_json, write_parquet
from spa_ray.pipeline.telemetry import Telemetry

EVAL_SEED_OFFSET = 1_000      # every policy is evaluated with the same sampling seeds
BASELINE_SEED_OFFSET = 2_000  # pi_init's baseline samples use other seeds than its own evaluation


class JudgeHealthError(RuntimeError):
    """The judge's accuracy on held-out gold pairs fell below the configured floor."""


class NotEnoughPairsError(RuntimeError):
    """A training set (seed pairs, or labelled pairs after ties were dropped) holds fewer
    pairs than one global batch: reported, not trained on."""


@dataclass
class PreparedData:
    seed_pairs: Path                  # token-level gold pairs D0 used for training
    judge_holdout: Path               # gold pairs kept out of training for the health check
    iteration_prompts: list[list[str]]
    evaluation_prompts: list[str]


# --------------------------------------------------------------------------- the run
class Run:
    """What every stage needs: config, run directory, task, pi_init, actors, telemetry."""

    def __init__(self, config: SPAConfig):
        from spa_ray.tasks.base import load_task

        self.config = config
        self.dir = RunDirectory(config.run.root, config.run.name)
        self._check_config()
        if config.run.start_from:  # copy pi_0 and what precedes it from another run
            from spa_ray.pipeline.start_from import adopt_seed_stages

            adopt_seed_stages(self.dir, config.run.start_from, config_to_dict(config))
        self.task = load_task(config.data.task, **config.data.task_kwargs)
        self.pi_init = self._resolve_pi_init()
        self.task.use_policy(self.pi_init)  # a task with on-policy gold pairs samples from this pi_init
        if config.audit.pairs and config.audit.auditor == "gold" and not self.task.has_gold_judge:
            raise ConfigError(
                f"audit.auditor=gold: task {config.data.task!r} has no gold judge to audit self-labels with; set "
                "audit.auditor=file (a person labels a sample each iteration) or module:function, or audit.pairs=0"
            )
        from spa_ray.models.loading import check_model_folder

        check_model_folder(self.pi_init)  # safetensors weights, before any stage starts
        self.telemetry = Telemetry(self.dir, config.run.name)
        self._actors: Any = None
        self._trainer: Any = None
        # checkpoint path -> WeightsHandle of the same tensors in Ray's object store (the newest
        # policy only): the trainer starts the next stage from it, the broadcast sends it
        self.weights_in_memory: dict[str, Any] = {}
        self.labels_ahead: dict[int, tuple[str, list[dict]]] = {}  # judge_t's labels, made during gen_t
        self.generation_ahead: dict[int, tuple[list[str], Any, float]] = {}  # gen_t's samples, sent during health_t
        self._warming: tuple[str, int] | None = None  # (path, version) the trainer loads ahead of its first stage

    @classmethod
    @contextlib.contextmanager
    def open(cls, config: SPAConfig) -> Iterator["Run"]:
        import ray

        started = False
        if not ray.is_initialized():
            ray.init(address=config.placement.ray_address, log_to_driver=True)
            started = True
        try:
            from spa_ray.pipeline.actor_system import check_placement

            check_placement(config)  # before anything is written into the run directory
            run = cls(config)
        except BaseException:
            if started:
                ray.shutdown()
            raise
        try:
            yield run
        finally:
            run.telemetry.close()
            if run._actors is not None:
                run._actors.shutdown()
            if run._trainer is not None:
                run._trainer.shutdown()
            if started:
                ray.shutdown()

    def _check_config(self) -> None:
        """A resumed run must use the config it started with, except that run.iterations may
        grow and RESOURCE_SETTINGS may change (each change is logged in metrics.jsonl)."""
        resolved = config_to_dict(self.config)
        path = self.dir.path / "config.yaml"
        if path.exists() and self.dir.finished_stages():  # before any stage finished, a corrected config may replace it
            # read through the loader: settings added to the project since the run started
            # take their defaults, so an older run resumes if it did not rely on them
            before = config_to_dict(load_config(path))
            # stop rules decide whether to go on, never what a stage computed
            allowed = {"run.iterations", "run.start_from", "judge.health_floor", "audit.floor", "audit.wait_s"}
            diffs = differing_keys(before, resolved, ignore=allowed | RESOURCE_SETTINGS)
            if diffs:
                raise ConfigError(
                    f"{path}: the run was started with another config ({', '.join(diffs)} differ); "
                    "resume with the same config or choose another run.name (resources may change: "
                    f"{', '.join(sorted(RESOURCE_SETTINGS))})"
                )
            changed = differing_keys(before, resolved, ignore=allowed)
            if changed:
                values = {key: [get_dotted(before, key), get_dotted(resolved, key)] for key in changed}
                self.dir.append_metrics({"kind": "config_change", "changed": values,
                                         "finished_stages": self.dir.finished_stages()})
                print(f"spa-ray: resuming with changed resource settings: {values}", flush=True)
        self.dir.write_text("config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    def _resolve_pi_init(self) -> str:
        if self.config.model.name_or_path:
            return self.config.model.name_or_path
        default_model = getattr(self.task, "default_model", None)
        if default_model is None:
            raise ConfigError(f"model.name_or_path: required, task {self.config.data.task!r} has no default model")
        return str(default_model())

    def checkpoint(self, t: int) -> str:
        return str(self.dir.path / "checkpoints" / f"pi_{t}")

    @property
    def actors(self):
        if self._actors is None:
            from spa_ray.pipeline.actor_system import ActorSystem

            on_trainer = self._label_on_trainer if self.config.judge.on_trainer else None
            self._actors = ActorSystem(self.config, self.pi_init, self.weights_in_memory, label_on_trainer=on_trainer)
        return self._actors

    @property
    def trainer(self):
        """The Ray Train worker group, started at the first training stage and kept for the job."""
        if self._trainer is None:
            from spa_ray.training.trainer_group import TrainerGroup

            self._trainer = TrainerGroup(self.config.placement.trainer, self.dir.path / "ray_train")
        return self._trainer

    def start_trainer_early(self) -> None:
        """Start the trainer group in the background when a training stage is left to run: its
        start-up (processes, imports, the process group) then overlaps the stages before it.
        Called once the data is read and checked, so bad input starts nothing."""
        iterations = self.config.run.iterations
        first = next((t for t in range(iterations + 1) if not self.dir.is_done(f"train_{t}")), None)
        if first is not None:  # its pi_{first-1} is read into the ranks' memory meanwhile (version = first)
            self.trainer.warm(_policy_path(self, first - 1), trust_remote_code=self.config.model.trust_remote_code)
            self._warming = (_policy_path(self, first - 1), first)

    def take_warmed_weights(self) -> float:
        """Publish the weights the trainer loaded ahead (``start_trainer_early``), unless newer
        ones are published: the first stage of a job then builds pi_{t-1} from memory too.
        Returns the seconds spent waiting for them (on a fresh machine: DeepSpeed's op build)."""
        if self._warming is None or self._trainer is None:
            return 0.0
        (path, version), self._warming = self._warming, None
        started = time.time()
        handle = self._trainer.warmed()
        if handle is not None and not self.weights_in_memory:
            self.publish(path, version, handle)
        return time.time() - started

    def pause_trainer(self) -> None:
        """Stop the trainer group so that a Ray task may use its CPUs/GPUs (judge models, teacher
        annotators); the next training stage starts it again, from the checkpoints on disk."""
        if self._trainer is not None:
            self._trainer.shutdown()

    def _label_on_trainer(self, version: int, policy_path: str, reference_path: str | None,
                          rows: list[dict]) -> list[dict]:
        """judge.on_trainer: the trainer's ranks label the rows with pi_{t-1}, from their memory
        when they still hold it (the checksum of the handle published for ``policy_path``)."""
        j = self.config.judge
        handle = self.weights_in_memory.get(str(policy_path))
        return self.trainer.label(rows, dict(
            policy_path=str(policy_path), policy_checksum=getattr(handle, "checksum", None),
            reference_path=None if reference_path is None else str(reference_path), beta=j.beta,
            length_penalty=j.length_penalty, max_tokens_per_batch=j.max_tokens_per_batch,
            dtype=self.config.model.dtype, trust_remote_code=self.config.model.trust_remote_code, version=version,
        ))

    def publish(self, path: str, version: int, weights: Any) -> None:
        """``weights`` (a WeightsHandle, or None) hold the checkpoint at ``path`` as ``version``;
        only the newest is kept, so the object store frees the one before."""
        self.weights_in_memory.clear()
        if weights is not None:
            self.weights_in_memory[str(path)] = weights.at(str(path), version)


# ------------------------------------------------------------------------- stages
def prepare_data(run: Run) -> PreparedData:
    """Prompt splits, the gold seed pairs D0 (tokenised) and the judge's held-out gold pairs."""
    stage = "prepare"
    if not run.dir.is_done(stage):
        from spa_ray.models.loading import load_tokenizer
        from spa_ray.training.pairs_table import tokenize_gold_pairs, write_pairs

        config = run.config
        splits = run.task.prompt_splits(seed=config.run.seed)
        if len(splits.iterations) < config.run.iterations:
            raise ConfigError(
                f"run.iterations: {config.run.iterations} iterations need as many prompt sets; "
                f"task {run.task.name!r} gives {len(splits.iterations)}"
            )
        pairs = run.task.seed_pairs(_gold_prompts(run, splits), seed=config.run.seed)
        n_holdout = int(round(config.data.judge_holdout_fraction * len(pairs)))
        holdout, train = pairs[:n_holdout], pairs[n_holdout:]
        tokenizer = load_tokenizer(run.pi_init, trust_remote_code=config.model.trust_remote_code)
        limits = dict(max_prompt_len=config.model.max_prompt_len, max_total_len=config.model.max_total_len)
        report = dict(run.task.data_report())  # e.g. duplicate prompts the task's loader dropped
        tables = {}
        for name, subset in (("seed_pairs", train), ("judge_holdout", holdout)):
            columns = tokenize_gold_pairs(tokenizer, subset, **limits)
            columns["gold_chosen"] = [p.chosen_score for p in subset]
            columns["gold_rejected"] = [p.rejected_score for p in subset]
            report[f"{name}_truncated"] = sum(n > 0 for n in columns["truncated_tokens"])
            tables[name] = columns
        if report.get("seed_pairs_truncated") or report.get("judge_holdout_truncated"):
            print(f"spa-ray: prepare: {report['seed_pairs_truncated']} seed pairs and "
                  f"{report['judge_holdout_truncated']} held-out pairs were cut to model.max_prompt_len="
                  f"{limits['max_prompt_len']} / model.max_total_len={limits['max_total_len']} (counted per row in "
                  "the tables' truncated_tokens column)", flush=True)
        with run.dir.stage_dir(stage, "data", "prepare", seed_pairs=len(train), judge_holdout=len(holdout),
                               **report) as out:
            for name, columns in tables.items():
                write_pairs(out / f"{name}.parquet", columns)
            write_json(
                out / "prompts.json",
                {"iterations": splits.iterations, "evaluation": splits.evaluation, "seed": splits.seed},
            )
        run.telemetry.stage(stage, seed_pairs=len(train), judge_holdout=len(holdout), **report)
    folder = run.dir.path / "data" / "prepare"
    prompts = read_json(folder / "prompts.json")
    return PreparedData(
        seed_pairs=_seed_pairs_path(run),
        judge_holdout=folder / "judge_holdout.parquet",
        iteration_prompts=prompts["iterations"],
        evaluation_prompts=prompts["evaluation"][: run.config.evaluation.num_prompts],
    )


def _gold_prompts(run: Run, splits) -> list[str]:
    """The seed set X0, or (data.gold_pairs=all, the DPO-on-100% baseline) every prompt
    outside the evaluation set, in the task's seeded order."""
    if run.config.data.gold_pairs == "seed":
        return list(splits.seed)
    if run.config.run.iterations != 0:
        raise ConfigError("data.gold_pairs=all trains the seed stage on every non-evaluation gold pair; "
                          f"it needs run.iterations=0, got {run.config.run.iterations}")
    if hasattr(run.task, "training_prompts"):
        return list(run.task.training_prompts(seed=run.config.run.seed))
    return list(splits.seed) + [p for prompts in splits.iterations for p in prompts]


JUDGE_PAIR_SEED_OFFSET = 3_000  # the reward model's gold pairs use other pair seeds than D0


def prepare_judge_model(run: Run, data: PreparedData) -> str | None:
    """judge.kind reward_model / llm_as_judge: train the judge once per run (one data seed).

    - reward_model: Bradley-Terry scalar scorer from pi_init on ``judge.model_pairs`` gold
      pairs of the task's demonstrations, on prompts outside the seed, iteration and
      evaluation sets (a shifted distribution, as PairRM's training data is to SPA's).
    - llm_as_judge: pi_init fine-tuned on D0 (the training seed pairs) as (A)/(B) questions.
    Trained in a Ray task with the judges' resources; the folder is ``judge_model/`` of the
    run directory. Returns its path, or None for SPA's own implicit-reward judge.
    """
    kind = run.config.judge.kind
    if kind == "implicit_reward":
        return None
    stage = "judge_model"
    final = run.dir.path / "judge_model"
    if run.dir.is_done(stage):
        return str(final)
    import random

    import ray

    from spa_ray.data.records import PreferencePair
    from spa_ray.judging.judge_models import JudgeTrainSpec, train_judge_model

    j, group = run.config.judge, run.config.placement.judges
    if kind == "reward_model":
        if not hasattr(run.task, "all_prompts"):
            raise ConfigError(f"judge.kind=reward_model: task {run.task.name!r} has no all_prompts() to draw the "
                              "reward model's gold pairs from")
        prompts_json = read_json(run.dir.path / "data" / "prepare" / "prompts.json")
        used = set(prompts_json["seed"]) | set(prompts_json["evaluation"])
        used |= {p for prompts in prompts_json["iterations"] for p in prompts}
        pool = [p for p in run.task.all_prompts() if p not in used]
        random.Random(run.config.run.seed + JUDGE_PAIR_SEED_OFFSET).shuffle(pool)
        pairs = run.task.seed_pairs(pool[: j.model_pairs], seed=run.config.run.seed + JUDGE_PAIR_SEED_OFFSET)
    else:
        d0 = read_parquet(data.seed_pairs)
        pairs = [PreferencePair(p, c, r, 1.0, 0.0) for p, c, r in zip(d0["prompt"], d0["chosen"], d0["rejected"])]
    spec = JudgeTrainSpec(
        epochs=j.model_epochs or (1 if kind == "reward_model" else 3), learning_rate=j.model_learning_rate,
        batch_size=j.model_batch_size, seed=run.config.run.seed, dtype=run.config.model.dtype,
        device="cuda" if group.num_gpus > 0 else "cpu",
    )
    options: dict[str, Any] = dict(num_cpus=max(group.num_cpus, 1.0), num_gpus=group.num_gpus)
    if group.resources:
        options["resources"] = dict(group.resources)
    task = ray.remote(train_judge_model).options(**options)
    run.pause_trainer()  # the task may need the CPUs/GPUs the trainer group holds
    started = time.time()
    with run.dir.stage_dir(stage, "judge_model", kind=kind, pairs=len(pairs)) as out:
        info = ray.get(task.remote(kind, run.pi_init, pairs, str(out), spec))
    run.telemetry.stage(stage, kind=kind, pairs=len(pairs), seconds=time.time() - started,
                        train_accuracy=info["final_train_accuracy"], train_loss=info["final_loss"])
    return str(final)


def check_judge_health(run: Run, t: int, data: PreparedData) -> float:
    """The judge (pi_{t-1} vs its reference) on gold pairs it never trained on.

    With judge.stream, gen_t's samples are sent to the generators first, so they sample
    while the judges check (gen_t collects them; a failed check leaves them unused)."""
    stage = f"health_{t}"
    if run.dir.is_done(stage):
        return float(run.dir.stage_info(stage)["accuracy"])
    if _streams(run) and not run.dir.is_done(f"gen_{t}"):
        prompts = data.iteration_prompts[t - 1]
        started = run.actors.start_generation(t, _policy_path(run, t - 1), prompts, _sampling(run, _gen_seed(run, t)))
        run.generation_ahead = {t: (list(prompts), started, time.time())}
    holdout = read_parquet(data.judge_holdout)
    if not holdout["prompt_ids"]:
        run.telemetry.stage(stage, accuracy=math.nan, note="no held-out gold pairs (data.judge_holdout_fraction=0)")
        with run.dir.stage_dir(stage, "health", f"iter_{t}", accuracy=math.nan):
            pass
        return math.nan
    rows = [
        {"prompt_ids": p, "response_ids_1": c, "response_ids_2": r, "prompt": pt, "response_1": ct, "response_2": rt}
        for p, c, r, pt, ct, rt in zip(holdout["prompt_ids"], holdout["chosen_ids"], holdout["rejected_ids"],
                                       holdout["prompt"], holdout["chosen"], holdout["rejected"])
    ]
    labels = _judge(run, t, rows)
    accuracy = sum(0.5 if x["is_tie"] else float(x["first_is_chosen"]) for x in labels) / len(labels)
    run.telemetry.stage(stage, judge_health=accuracy, iteration=t)
    floor = run.config.judge.health_floor
    if accuracy < floor:
        raise JudgeHealthError(
            f"iteration {t}: the judge (pi_{t - 1}) agrees with held-out gold labels on only "
            f"{accuracy:.3f} of {len(rows)} pairs, below judge.health_floor={floor}. Self-labelling "
            "would train on noise; stopping. Check the seed stage, or lower the floor knowingly."
        )
    with run.dir.stage_dir(stage, "health", f"iter_{t}", accuracy=accuracy) as out:
        write_json(out / "health.json", {"accuracy": accuracy, "pairs": len(rows)})
    return accuracy


def generate_responses(run: Run, t: int, prompts: list[str]) -> Path:
    """Two samples per prompt of X_t from pi_{t-1} (temperature 0.7, <= 300 new tokens).

    With judge.stream (the default for the implicit reward), the judges label each shard's
    pairs while the generators sample the next; judge_t then only checks and records them."""
    stage = f"gen_{t}"
    final = run.dir.path / "data" / f"iter_{t}" / "generations" / "generations.parquet"
    if run.dir.is_done(stage):
        return final
    seed = _gen_seed(run, t)
    if _streams(run):
        rows = _sample_and_label(run, t, prompts, seed)  # judge_t then finds its labels ready
    else:
        rows = _sample(run, version=t, path=_policy_path(run, t - 1), prompts=prompts, seed=seed)
    with run.dir.stage_dir(stage, "data", f"iter_{t}", "generations", rows=len(rows)) as out:
        write_parquet(out / "generations.parquet", _columns(rows))
    run.telemetry.stage(stage, iteration=t, responses=len(rows))
    return final


def _streams(run: Run) -> bool:
    """Whether gen_t's pairs are labelled while it samples (judge.stream, implicit reward only)."""
    j = run.config.judge
    return j.stream and j.kind == "implicit_reward" and not j.on_trainer


def _gen_seed(run: Run, t: int) -> int:
    return run.config.run.seed * 100 + t


def _policy_path(run: Run, t: int) -> str:
    """pi_t's folder; pi_{-1} stands for pi_init."""
    return run.pi_init if t < 0 else run.checkpoint(t)


def _judge(run: Run, t: int, rows: list[dict]) -> list[dict]:
    """Label rows with pi_{t-1} against the judge reference (pi_init, pi_{t-2}, or none); or,
    for judge.kind reward_model / llm_as_judge, with the run's trained judge (on the rows' text)."""
    if run.config.judge.kind != "implicit_reward":
        if not run.dir.is_done("judge_model"):
            raise RuntimeError(f"judge.kind={run.config.judge.kind}: prepare_judge_model must run before judging")
        return run.actors.label_by_model(str(run.dir.path / "judge_model"), rows)
    return run.actors.label(t, _policy_path(run, t - 1), _policy_path(run, t - 2), rows)


def _sample(run: Run, version: int, path: str, prompts: list[str], seed: int, n: int | None = None) -> list[dict]:
    started = time.time()
    rows = run.actors.generate(version, path, prompts, _sampling(run, seed, n))
    _gauge_tokens_per_second(run, rows, started)
    return rows


def _sample_and_label(run: Run, t: int, prompts: list[str], seed: int) -> list[dict]:
    """``_sample`` for gen_t, with the judges labelling each shard's pairs as it arrives; the
    labels wait in ``run.labels_ahead`` for judge_t, keyed by a digest of the rows labelled."""
    from spa_ray.judging.pair_selection import scored_sample_pairs
    from spa_ray.pipeline.self_labels import judge_rows

    reuse, rule = run.config.judge.reuse_generator_logprobs, run.config.judge.pair_rule
    ahead_prompts, ahead, started = run.generation_ahead.pop(t, (None, None, time.time()))  # sent during health_t
    rows, judged, labels = run.actors.generate_and_label(
        t, _policy_path(run, t - 1), _policy_path(run, t - 2), prompts, _sampling(run, seed),
        pair_rows=lambda samples: judge_rows(_columns(samples), rule, reuse, where="the generator's samples")[1],
        rows_per_prompt=len(scored_sample_pairs(run.config.generation.responses_per_prompt, rule)),
        started=ahead if ahead_prompts == list(prompts) else None,
    )
    _gauge_tokens_per_second(run, rows, started)
    run.labels_ahead = {t: (_rows_digest(judged), labels)}
    return rows


def _gauge_tokens_per_second(run: Run, rows: list[dict], started: float) -> None:
    seconds = max(time.time() - started, 1e-9)
    run.telemetry.gauge("tokens_per_second", sum(len(r["response_ids"]) for r in rows) / seconds)


def _sampling(run: Run, seed: int, n: int | None = None) -> dict:
    g = run.config.generation
    return {"n": n or g.responses_per_prompt, "temperature": g.temperature, "top_p": g.top_p,
            "max_new_tokens": g.max_new_tokens, "seed": seed}


def _rows_digest(rows: list[dict]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _columns(rows: list[dict]) -> dict[str, list]:
    """Generation rows as table columns; the per-token untempered log-probs are kept only as
    their sum ``policy_logp`` (log pi of the response under the generating policy)."""
    keys = [k for k in rows[0] if k != "raw_logprobs"] if rows else []
    columns = {k: [r[k] for r in rows] for k in keys}
    if rows and all(r.get("raw_logprobs") is not None for r in rows):
        columns["policy_logp"] = [float(sum(r["raw_logprobs"])) for r in rows]
    return columns


def judge_pairs(run: Run, t: int, generations: Path) -> Path:
    """D_t: for each prompt, the pair judge.pair_rule takes of its samples, ordered by the
    judge -- by default the implicit reward r = beta*log(pi_{t-1}/pi_ref) (Eq. 7-8), else
    judge.kind's trained model; ties dropped. Then the confidence filter (judge.keep_fraction,
    judge.min_margin) keeps the surest pairs, audit.pairs random judged pairs are held out for
    the label audit, and training.seed_replay mixes gold seed pairs in.

    pairs.parquet: what train_t reads (column source: self or seed). judged.parquet: every
    judged pair with its margin, kept and audit marks (and gold scores, for the record)."""
    stage = f"judge_{t}"
    folder = run.dir.path / "data" / f"iter_{t}" / "pairs"
    if run.dir.is_done(stage):
        return folder / "pairs.parquet"
    from spa_ray.pipeline.self_labels import judge_rows, mark_pairs, ordered_pairs, training_table

    j = run.config.judge
    gen = read_parquet(generations)
    order, rows = judge_rows(gen, j.pair_rule, j.reuse_generator_logprobs, where=generations)
    digest, labels = run.labels_ahead.pop(t, (None, None))
    if labels is None or digest != _rows_digest(rows):  # none labelled during gen_t (e.g. a resumed run)
        started = time.time()
        labels = _judge(run, t, rows)
        run.telemetry.gauge("pairs_per_second", len(rows) / max(time.time() - started, 1e-9))
    judged, stats = ordered_pairs(gen, order, labels, j.pair_rule)
    gold = _gold_scores(run, judged["prompt"], judged["chosen"], judged["rejected"])
    if gold is not None:
        judged["gold_chosen"], judged["gold_rejected"] = gold
    seed = _gen_seed(run, t)
    kept, audited = mark_pairs(judged["margin"], j.keep_fraction, j.min_margin, run.config.audit.pairs, seed, j.keep_by)
    replay = run.config.training.seed_replay
    table = training_table(judged, kept, audited, read_parquet(_seed_pairs_path(run)) if replay else {}, replay, seed)
    stats.update(pairs=table["source"].count("self"), judged_pairs=len(kept), kept=sum(kept),
                 audit_pairs=sum(audited), replayed=table["source"].count("seed"))
    if gold is not None:
        trained = [k and not a for k, a in zip(kept, audited)]
        stats.update(gold_agreement=_agreement(judged, trained), gold_agreement_judged=_agreement(judged, [True] * len(kept)))
        stats["gold_decided_pairs"] = sum(c != r for c, r, m in zip(*gold, trained) if m)
    with run.dir.stage_dir(stage, "data", f"iter_{t}", "pairs", **stats) as out:
        from spa_ray.training.pairs_table import write_pairs

        write_parquet(out / "judged.parquet", {**judged, "kept": kept, "audit": audited})
        write_pairs(out / "pairs.parquet", table)
    run.telemetry.stage(stage, iteration=t, **stats)
    return folder / "pairs.parquet"


def audit_labels(run: Run, t: int, pairs: Path) -> dict[str, Any]:
    """The on-policy label audit of judge_t: the pairs it held out, labelled by audit.auditor;
    LabelAuditError (the run stops before train_t) when agreement is below audit.floor."""
    from spa_ray.pipeline.label_audit import LabelAuditError, audit_summary, make_auditor

    stage, cfg = f"audit_{t}", run.config.audit
    if run.dir.is_done(stage):
        return run.dir.stage_info(stage)
    if not cfg.pairs:
        return {}
    judged = read_parquet(Path(pairs).with_name("judged.parquet"))
    rows = [i for i, a in enumerate(judged["audit"]) if a]
    auditor = make_auditor(cfg.auditor, run.task, run.dir.path / "data" / f"iter_{t}" / "audit_request", cfg.wait_s,
                           seed=_gen_seed(run, t))
    verdicts = list(auditor([judged["prompt"][i] for i in rows], [judged["chosen"][i] for i in rows],
                            [judged["rejected"][i] for i in rows]))
    if len(verdicts) != len(rows):
        raise LabelAuditError(f"label audit: audit.auditor={cfg.auditor} returned {len(verdicts)} labels for "
                              f"{len(rows)} pairs")
    summary = audit_summary(verdicts, cfg.floor)  # refuses anything but True / False / None
    verdicts = [None if v is None else bool(v) for v in verdicts]
    # the audited pairs the filter kept: the trained pairs' own figure (few, with a filter)
    kept = audit_summary([v for v, i in zip(verdicts, rows) if judged["kept"][i]], cfg.floor)
    summary.update({f"kept_{k}": kept[k] for k in ("audited", "decided", "agreement", "ci_low", "ci_high")})
    health = run.dir.stage_info(f"health_{t}").get("accuracy") if run.dir.is_done(f"health_{t}") else None
    run.telemetry.stage(stage, iteration=t, judge_health=health, **summary)
    print(f"spa-ray: label audit {t}: self-labels agree with audit.auditor={cfg.auditor} on "
          f"{summary['agreement']:.3f} (95% CI {summary['ci_low']:.3f}-{summary['ci_high']:.3f}) of "
          f"{summary['decided']} decided pairs ({summary['kept_agreement']:.3f} of the {summary['kept_decided']} the "
          f"filter kept); judge health (off-policy) {health}", flush=True)
    if not summary["passed"]:
        raise LabelAuditError(
            f"iteration {t}: the self-labels agree with the auditor ({cfg.auditor}) on only {summary['agreement']:.3f} "
            f"of {summary['decided']} audited pairs (95% CI {summary['ci_low']:.3f}-{summary['ci_high']:.3f}), wholly "
            f"below audit.floor={cfg.floor}; stopping before pi_{t} is trained on them. pi_{t - 1} and everything before "
            "it are kept. Lower training.learning_rate, or lower the floor "
            "knowingly (audit.floor may change on resume)."
        )
    with run.dir.stage_dir(stage, "data", f"iter_{t}", "audit", **summary) as out:
        write_json(out / "audit.json", summary)
        write_parquet(out / "audited.parquet", {"pair": rows, "agrees": verdicts})
    return summary


def _agreement(judged: dict[str, list], mask: list[bool]) -> float:
    """Share of the masked pairs whose label agrees with gold, among those gold does not tie."""
    decided = [(c, r) for c, r, m in zip(judged["gold_chosen"], judged["gold_rejected"], mask) if m and c != r]
    return sum(c > r for c, r in decided) / max(len(decided), 1)


def _seed_pairs_path(run: Run) -> Path:
    return run.dir.path / "data" / "prepare" / "seed_pairs.parquet"


def _gold_scores(run: Run, prompts: list[str], *responses: list[str]) -> tuple[list[float], ...] | None:
    """Gold scores for the record (never used for training); None for tasks without a gold judge."""
    try:
        return tuple(run.task.score_many(prompts, r) for r in responses)
    except NotImplementedError:
        return None


def train_policy(run: Run, t: int, policy: str, pairs: Path) -> str:
    """t = 0: DPO on the seed (3 epochs). t >= 1: refined DPO (Eq. 9-12), init = ref = pi_{t-1}."""
    import dataclasses

    from spa_ray.objectives.noise_detection import lambda_for_iteration
    from spa_ray.training.worker import TrainStageSpec

    stage = f"train_{t}"
    if run.dir.is_done(stage):
        return run.checkpoint(t)
    cfg = run.config.training
    _require_one_batch(run, t, pairs)
    refine = t >= 1 and cfg.self_refine
    lam = lambda_for_iteration(t, first=cfg.lambda_first) if (refine and cfg.decoupled_noise_detection) else 0.0
    with run.dir.stage_dir(stage, "checkpoints", f"pi_{t}") as out:
        spec = TrainStageSpec(
            stage=stage,
            policy_path=str(policy),
            reference_path=str(policy),
            pairs_path=str(pairs),
            output_dir=str(out),
            epochs=cfg.seed_epochs if t == 0 else cfg.iteration_epochs,
            refine=refine,
            lam=lam,
            seed=run.config.run.seed * 100 + t,
            beta=cfg.beta,
            alpha=cfg.alpha,
            k_percent=cfg.k_percent,
            confidence_window=cfg.confidence_window,
            denoise_warmup=cfg.denoise_warmup,
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            warmup_ratio=cfg.warmup_ratio,
            global_batch_size=cfg.global_batch_size,
            micro_batch_size=cfg.micro_batch_size,
            max_grad_norm=cfg.max_grad_norm,
            zero_stage=cfg.zero_stage,
            deepspeed=dict(cfg.deepspeed),
            dtype=run.config.model.dtype,
            noise_chunk_size=cfg.noise_chunk_size,
            checkpoint_every=cfg.checkpoint_every,
            trust_remote_code=run.config.model.trust_remote_code,
        )
        from spa_ray.variants.stage import prepare_variant_stage

        spec = prepare_variant_stage(run, t, spec, out)  # unchanged for variant.name=spa (README "Variants")
        warm_wait = run.take_warmed_weights()
        warm = run.weights_in_memory  # the trainer's ranks still hold pi_{t-1}: no folder read
        spec = dataclasses.replace(
            spec,
            policy_checksum=getattr(warm.get(spec.policy_path), "checksum", None),
            reference_checksum=getattr(warm.get(spec.reference_path), "checksum", None),
        )
        started = time.time()
        result = run.trainer.train_stage(spec)
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
        for record in log:
            run.telemetry.train_step(stage, record)
        flagged = _flag_quality(out, pairs)
        if t >= 1:
            _write_labelled_pairs(run, t, out, pairs)
    # recorded in the ledger and whole on disk: now the generators and judges may take it
    run.publish(run.checkpoint(t), t + 1, result.weights)
    timing = dict(step_seconds=result.step_seconds, fixed_seconds=result.fixed_seconds, attempts=result.attempts,
                  warm_wait_seconds=warm_wait,
                  from_memory=result.details["from_memory"], trainer_models_seconds=result.details["models_seconds"],
                  trainer_setup_seconds=result.details["setup_seconds"], trainer_save_seconds=result.details["save_seconds"])
    run.telemetry.stage(stage, iteration=t, seconds=time.time() - started, refine=spec.refine, lam=spec.lam,
                        **timing, **flagged)
    return run.checkpoint(t)


def _require_one_batch(run: Run, t: int, pairs: Path) -> None:
    """NotEnoughPairsError before any worker starts when ``pairs`` cannot fill one global batch."""
    import pyarrow.parquet as pq

    n = pq.ParquetFile(pairs).metadata.num_rows
    batch = run.config.training.global_batch_size
    if n >= batch:
        return
    if t == 0:
        what = f"the seed set D0 holds {n} gold pairs"
    else:
        ties = run.dir.stage_info(f"judge_{t}").get("ties", 0) if run.dir.is_done(f"judge_{t}") else 0
        what = f"iteration {t}'s labelled set holds {n} pairs ({ties} ties dropped by the judge)"
    raise NotEnoughPairsError(
        f"train_{t}: {what} in {pairs}, fewer than one global batch "
        f"(training.global_batch_size={batch}); not training on it. pi_{t - 1 if t else 'init'} is left as it was."
    )


def _write_labelled_pairs(run: Run, t: int, checkpoint: Path, pairs: Path) -> None:
    """data/iter_t/labelled_pairs.parquet: D_t with each pair's confidence and z flag from training.

    Written before train_t is recorded finished (a rerun rewrites it), atomically.
    """
    flags_path = checkpoint / "noise_flags.parquet"
    if not flags_path.exists():
        return
    table = read_parquet(pairs)
    flags = read_parquet(flags_path)
    n = len(table["prompt_ids"])
    z: list = [None] * n  # pairs left out by the last partial batch keep None
    confidence: list = [None] * n
    for i, c, flag in zip(flags["pair_index"], flags["confidence"], flags["z"]):
        z[i], confidence[i] = flag, c
    table.update(z=z, confidence=confidence)
    final = run.dir.subpath("data", f"iter_{t}", "labelled_pairs.parquet")
    tmp = final.with_name(f".tmp-{final.name}")
    write_parquet(tmp, table)
    tmp.replace(final)


def _flag_quality(checkpoint: Path, pairs: Path) -> dict[str, float]:
    """How many flagged pairs (z = 1) were really mislabelled by the judge (needs gold scores)."""
    flags_path = checkpoint / "noise_flags.parquet"
    if not flags_path.exists():
        return {}
    flags = read_parquet(flags_path)
    table = read_parquet(pairs)
    out = {"noise_flag_rate": sum(flags["z"]) / max(len(flags["z"]), 1)}
    if "gold_chosen" in table:
        self_labelled = [table.get("source", ["self"] * len(table["gold_chosen"]))[i] == "self" for i in flags["pair_index"]]
        wrong = [table["gold_chosen"][i] < table["gold_rejected"][i] for i in flags["pair_index"]]
        flagged = [w for w, z, s in zip(wrong, flags["z"], self_labelled) if z and s]  # replayed gold pairs left out
        unflagged = [w for w, z, s in zip(wrong, flags["z"], self_labelled) if not z and s]
        if flagged:
            out["flagged_mislabelled"] = sum(flagged) / len(flagged)
        if unflagged:
            out["unflagged_mislabelled"] = sum(unflagged) / len(unflagged)
    return out


def evaluate(run: Run, policy: str, version: int, name: str) -> dict[str, float]:
    """Held-out prompts: gold win rate vs pi_init (ties half), LC win rate, mean length."""
    from spa_ray.evaluation.alpaca_eval import write_alpaca_eval_outputs
    from spa_ray.evaluation.win_rates import gold_win_rate, length_controlled_win_rate, mean_length

    stage = f"eval_{name}"
    if run.dir.is_done(stage):
        return read_json(run.dir.path / "eval" / name / "summary.json")
    prompts = read_json(run.dir.path / "data" / "prepare" / "prompts.json")["evaluation"][: run.config.evaluation.num_prompts]
    n = run.config.evaluation.samples_per_prompt
    seed = run.config.run.seed
    if name == "init" and not run.dir.is_done("eval_baseline"):
        baseline = _sample(run, version, policy, prompts, seed=seed + BASELINE_SEED_OFFSET, n=n)
        baseline_scores = _gold_scores(run, [r["prompt"] for r in baseline], [r["text"] for r in baseline])
        with run.dir.stage_dir("eval_baseline", "eval", "baseline") as out:
            cols = _columns(baseline)
            if baseline_scores is not None:
                cols["gold"] = baseline_scores[0]
            write_parquet(out / "samples.parquet", cols)
    rows = _sample(run, version, policy, prompts, seed=seed + EVAL_SEED_OFFSET, n=n)
    summary: dict[str, float] = {"mean_length": mean_length([len(r["response_ids"]) for r in rows])}
    scores = _gold_scores(run, [r["prompt"] for r in rows], [r["text"] for r in rows])
    base = read_parquet(run.dir.path / "eval" / "baseline" / "samples.parquet")
    if scores is not None and "gold" in base:
        mine = scores[0]
        summary["gold_score"] = sum(mine) / len(mine)
        summary["win_rate"] = gold_win_rate(mine, base["gold"])
        summary["lc_win_rate"] = length_controlled_win_rate(
            mine, base["gold"], [len(r["response_ids"]) for r in rows], [len(x) for x in base["response_ids"]]
        )
    with run.dir.stage_dir(stage, "eval", name, **summary) as out:
        cols = _columns(rows)
        if scores is not None:
            cols["gold"] = scores[0]
        write_parquet(out / "samples.parquet", cols)
        write_json(out / "summary.json", summary)
        if run.config.evaluation.alpaca_eval_json:
            write_alpaca_eval_outputs(
                out / "alpaca_eval.json", [r["prompt"] for r in rows], [r["text"] for r in rows],
                generator=f"{run.config.run.name}/{name}",
            )
    run.telemetry.stage(stage, **summary)
    return summary


# -------------------------------------------------------------------------- report
def results_table(run: Run) -> list[dict[str, Any]]:
    return run_results(run.dir, run.config.run.iterations)


def run_results(run_dir: RunDirectory, iterations: int) -> list[dict[str, Any]]:
    """The final table's rows from a run directory's files alone (no Ray, no config)."""
    rows = []
    names = ["init", "pi_0"] + [f"pi_{t}" for t in range(1, iterations + 1)]
    labels = {"init": "SFT (pi_init)", "pi_0": "seed DPO (pi_0)"}
    for name in names:
        if not run_dir.is_done(f"eval_{name}"):
            continue
        summary = read_json(run_dir.path / "eval" / name / "summary.json")
        row = {"stage": labels.get(name, f"SPA iteration {name[3:]} ({name})"), **summary}
        if name.startswith("pi_") and name != "pi_0":
            t = int(name[3:])
            if run_dir.is_done(f"judge_{t}"):
                info = run_dir.stage_info(f"judge_{t}")
                row["label_agreement"] = info.get("gold_agreement", math.nan)
                row["ties"] = info.get("ties", 0)
            if run_dir.is_done(f"health_{t}"):
                row["judge_health"] = run_dir.stage_info(f"health_{t}").get("accuracy", math.nan)
            if run_dir.is_done(f"audit_{t}"):
                row["label_audit"] = run_dir.stage_info(f"audit_{t}").get("agreement", math.nan)
        rows.append(row)
    return rows


def print_final_table(run: Run) -> None:
    rows = results_table(run)
    cols = [("stage", "stage", "{}"), ("win_rate", "gold win rate", "{:.3f}"), ("lc_win_rate", "LC win rate", "{:.3f}"),
            ("mean_length", "length", "{:.1f}"), ("label_agreement", "label agreement", "{:.3f}"),
            ("label_audit", "label audit", "{:.3f}"), ("judge_health", "judge health", "{:.3f}")]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for key, _, fmt in cols:
            value = row.get(key)
            cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    run.dir.write_text("results.md", f"# {run.config.run.name}\n\n{table}\n")
    run.telemetry.plots(rows)
    print(f"\nspa-ray: run {run.dir.path}\n{table}\n")


__all__ = [
    "JudgeHealthError", "NotEnoughPairsError", "PreparedData", "Run", "audit_labels", "check_judge_health", "evaluate",
    "generate_responses",
    "judge_pairs", "prepare_data", "prepare_judge_model", "print_final_table", "results_table", "run_results", "train_policy",
]
