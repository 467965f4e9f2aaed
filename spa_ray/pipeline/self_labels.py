"""From an iteration's samples and the judge's labels to D_t, the table train_t reads.

judge_t (``stages.judge_pairs``) does the I/O; this module is the bookkeeping between:
1. ``judge_rows``: which pairs of each prompt's samples the judge scores (``pair_rule``);
2. ``ordered_pairs``: each prompt's (chosen, rejected) by the judge's rewards; ties dropped;
3. ``mark_pairs``: the confidence filter (kept) and the audit sample, on every judged pair;
4. ``training_table``: the kept, unaudited pairs plus replayed gold seed pairs.
The math (rules, filter, draws) is ``spa_ray.judging.pair_selection``.
"""

from __future__ import annotations

import math
from typing import Any

from spa_ray.judging.pair_selection import audit_indices, confident_mask, pick_pair, replay_indices, scored_sample_pairs

__all__ = ["judge_rows", "ordered_pairs", "mark_pairs", "training_table", "PAIR_COLUMNS"]

#: the columns of a judged pair (then gold scores, when the task has a gold judge)
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids",
                "reward_chosen", "reward_rejected", "probability", "margin")


def judge_rows(gen: dict[str, list], rule: str, reuse_logprobs: bool, where: Any
               ) -> tuple[list[tuple[int, int]], list[dict]]:
    """The rows to judge, prompt by prompt: the sample pairs ``rule`` scores (each prompt's
    first two samples by sample_index; for max_min all of them, two per row). Returns each
    row's (a, b) generation-row indices and the judge rows."""
    by_prompt: dict[int, list[int]] = {}
    for i, p in enumerate(gen["prompt_index"]):
        by_prompt.setdefault(p, []).append(i)
    order: list[tuple[int, int]] = []
    for _, idx in sorted(by_prompt.items()):
        samples = sorted(idx, key=lambda i: gen["sample_index"][i])
        order += [(samples[i], samples[j]) for i, j in scored_sample_pairs(len(samples), rule)]
    rows = [
        {"prompt_ids": gen["prompt_ids"][a], "response_ids_1": gen["response_ids"][a], "response_ids_2": gen["response_ids"][b],
         "prompt": gen["prompt"][a], "response_1": gen["text"][a], "response_2": gen["text"][b]}
        for a, b in order
    ]
    if reuse_logprobs:
        # Off by default: the engine's numerics (KV cache, padded batches, vLLM kernels)
        # make these differ from a teacher-forced log pi, which is what Eq. 7 asks for.
        if "policy_logp" not in gen:
            raise RuntimeError(
                f"judge.reuse_generator_logprobs=true, but {where} has no untempered log-probs "
                "(policy_logp): its generator did not return them"
            )
        for row, (a, b) in zip(rows, order):
            row["policy_logp_1"], row["policy_logp_2"] = gen["policy_logp"][a], gen["policy_logp"][b]
    return order, rows


def ordered_pairs(gen: dict[str, list], order: list[tuple[int, int]], labels: list[dict], rule: str
                  ) -> tuple[dict[str, list], dict[str, Any]]:
    """One (chosen, rejected) pair per prompt, as table columns (PAIR_COLUMNS), and counts.

    ``first_two``: the judge's label of the row (Eq. 8), its probability as p(y_w > y_l).
    ``max_min``: every sample's reward from the rows that scored it (the first, for a sample
    scored twice), the highest against the lowest. ``margin`` = r_w - r_l >= 0."""
    columns: dict[str, list] = {k: [] for k in PAIR_COLUMNS}
    ties = earlier_chosen = 0
    for rows in _rows_by_prompt(gen, order):
        if rule == "first_two":
            (a, b), label = order[rows[0]], labels[rows[0]]
            if label["is_tie"]:
                ties += 1
                continue
            first = bool(label["first_is_chosen"])
            w, l = (a, b) if first else (b, a)
            rw, rl = (label["reward_1"], label["reward_2"]) if first else (label["reward_2"], label["reward_1"])
            probability = max(label["probability"], 1.0 - label["probability"])
        else:
            rewards: dict[int, float] = {}
            for r in rows:
                (a, b), label = order[r], labels[r]
                rewards.setdefault(a, label["reward_1"])
                rewards.setdefault(b, label["reward_2"])
            samples = list(rewards)  # in sample order
            picked = pick_pair([rewards[s] for s in samples], rule)
            if picked is None:
                ties += 1
                continue
            w, l = samples[picked[0]], samples[picked[1]]
            rw, rl = rewards[w], rewards[l]
            probability = 1.0 / (1.0 + math.exp(-(rw - rl)))
        earlier_chosen += int(gen["sample_index"][w] < gen["sample_index"][l])
        for key, value in (("prompt", gen["prompt"][w]), ("chosen", gen["text"][w]), ("rejected", gen["text"][l]),
                           ("prompt_ids", gen["prompt_ids"][w]), ("chosen_ids", gen["response_ids"][w]),
                           ("rejected_ids", gen["response_ids"][l]), ("reward_chosen", rw), ("reward_rejected", rl),
                           ("probability", probability), ("margin", abs(rw - rl))):
            columns[key].append(value)
    pairs = len(columns["prompt"])
    return columns, {"ties": ties, "label_balance": earlier_chosen / max(pairs, 1)}


def _rows_by_prompt(gen: dict[str, list], order: list[tuple[int, int]]) -> list[list[int]]:
    """Judge-row indices grouped by prompt (rows of one prompt are consecutive)."""
    groups: list[list[int]] = []
    last = None
    for r, (a, _) in enumerate(order):
        prompt = gen["prompt_index"][a]
        if prompt != last:
            groups.append([])
            last = prompt
        groups[-1].append(r)
    return groups


def mark_pairs(margins: list[float], keep_fraction: float, min_margin: float, audit_pairs: int, seed: int,
               keep_by: str = "margin") -> tuple[list[bool], list[bool]]:
    """(kept, audited) per judged pair: the confidence filter, and ``audit_pairs`` random
    judged pairs (at most a quarter of them) for the label audit; D_t is kept and not audited.

    The audit draws from every judged pair, not only the kept ones: it then measures the
    judge with as many pairs whatever the filter keeps (a filter keeping 25% would leave a
    kept-only audit a few dozen decided pairs), and audited pairs the filter dropped cost
    no training pairs. The kept ones among them give the trained pairs' own figure."""
    kept = confident_mask(margins, keep_fraction=keep_fraction, min_margin=min_margin, keep_by=keep_by, seed=seed)
    drawn = set(audit_indices(range(len(margins)), min(audit_pairs, len(margins) // 4), seed))
    return kept, [i in drawn for i in range(len(margins))]


def training_table(judged: dict[str, list], kept: list[bool], audited: list[bool], seed_pairs: dict[str, list],
                   replay_share: float, seed: int) -> dict[str, list]:
    """D_t: the judged pairs kept and not audited (source "self"), then gold seed pairs drawn
    to be ``replay_share`` of the table (source "seed"; probability 1, rewards and margin null)."""
    chosen = [i for i in range(len(kept)) if kept[i] and not audited[i]]
    table = {key: [values[i] for i in chosen] for key, values in judged.items()}
    table["source"] = ["self"] * len(chosen)
    replayed = replay_indices(len(seed_pairs.get("prompt_ids", [])), len(chosen), replay_share, seed)
    filler = {"reward_chosen": None, "reward_rejected": None, "probability": 1.0, "margin": None, "source": "seed"}
    for key in table if replayed else ():
        if key in filler:
            table[key] += [filler[key]] * len(replayed)
        elif key in seed_pairs:
            table[key] += [seed_pairs[key][i] for i in replayed]
        else:
            raise ValueError(f"seed replay: the seed pairs table has no column {key!r} that D_t has")
    return table
