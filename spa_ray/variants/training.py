"""The trainer-worker side of a variant: its objective and the per-micro-batch extras.

``worker.run_stage`` builds one ``TrainVariant`` from ``TrainStageSpec.variant``
(None for SPA: the worker then runs exactly its SPA path). Per micro-batch it adds the
pairs table's per-pair columns the objective reads (``pair_beta``, ``pair_win_prob``,
``pair_similarity``) and, for SSPO, a slice of the unpaired pool chosen as a pure
function of (seed, step, rank, micro-batch), so a resumed stage sees the same rows.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from spa_ray.variants.objective import VariantObjective, build_objective

PAIR_COLUMNS = {"sp2dpo": ("beta",), "s_sppo": ("win_prob", "similarity")}


class TrainVariant:
    def __init__(self, variant: dict[str, Any], table: dict[str, list], *, seed: int, rank: int,
                 micro_batch_size: int, gather: Callable | None = None):
        self.variant = dict(variant)
        self.name = variant["name"]
        self.table = table
        self.seed, self.rank = seed, rank
        self.columns = PAIR_COLUMNS.get(self.name, ())
        missing = [c for c in self.columns if c not in table]
        if missing:
            raise ValueError(f"variant {self.name}: the pairs table has no column(s) {missing}")
        self.unpaired: dict[str, list] | None = None
        n_unpaired = 0
        if self.name == "sspo" and variant.get("unpaired_path"):
            from spa_ray.variants.unpaired import read_unpaired

            self.unpaired = read_unpaired(variant["unpaired_path"])
            n_unpaired = len(self.unpaired["prompt_ids"])
        self.per_micro = int(variant.get("unpaired_per_micro_batch") or micro_batch_size)
        self.objective: VariantObjective = build_objective(
            variant, n_paired=len(table["prompt_ids"]), n_unpaired=n_unpaired, gather=gather
        )

    def batch_extras(self, micro: list[int], step: int, j: int, pad_token_id: int) -> dict[str, torch.Tensor]:
        out = {f"pair_{c}": torch.tensor([float(self.table[c][i]) for i in micro], dtype=torch.float32)
               for c in self.columns}
        if self.unpaired is not None and self.unpaired["prompt_ids"]:
            out.update(self._unpaired_rows(step, j, pad_token_id))
        return out

    def _unpaired_rows(self, step: int, j: int, pad_token_id: int) -> dict[str, torch.Tensor]:
        n = len(self.unpaired["prompt_ids"])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 10_007 + self.rank * 101 + j)
        idx = torch.randperm(n, generator=g)[: min(self.per_micro, n)].tolist()
        seqs = []
        for i in idx:
            p = [int(t) for t in self.unpaired["prompt_ids"][i]]
            r = [int(t) for t in self.unpaired["response_ids"][i]]
            seqs.append((p + r, len(p)))
        T = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        resp = torch.zeros((len(seqs), T), dtype=torch.bool)
        for k, (s, lp) in enumerate(seqs):
            ids[k, : len(s)] = torch.tensor(s)
            attn[k, : len(s)] = 1
            resp[k, lp: len(s)] = True
        return {"unpaired_input_ids": ids, "unpaired_attention_mask": attn, "unpaired_response_mask": resp}

    def state_dict(self) -> dict:
        return self.objective.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)


__all__ = ["PAIR_COLUMNS", "TrainVariant"]
