"""ConfidenceWindow: tau and z on hand-built windows, warm-up, eviction, and a real
2-process gloo group where each rank sees different confidences."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spa_ray.objectives import ConfidenceWindow, all_gather_1d
from spa_ray.objectives._checks import NonFiniteValuesError

T = torch.tensor


def test_hand_built_window_tau_and_z():
    w = ConfidenceWindow(size=5, k_percent=25.0, warmup_fraction=0.0)
    # sorted [.1 .3 .5 .7 .9]; 25th percentile, linear: position 0.25*4 = 1 -> 0.3
    z = w.flags(T([0.9, 0.1, 0.5, 0.3, 0.7]), step=0, total_steps=10)
    assert w.tau == pytest.approx(0.3)
    assert z.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]  # strict: 0.3 is not < 0.3
    # append then evict the two oldest (.9, .1): window [.5 .3 .7 .2 .8] -> sorted [.2 .3 .5 .7 .8] -> tau .3
    z = w.flags(T([0.2, 0.8]), step=1, total_steps=10)
    assert w.values.tolist() == pytest.approx([0.5, 0.3, 0.7, 0.2, 0.8])
    assert w.tau == pytest.approx(0.3)
    assert z.tolist() == [1.0, 0.0]


def test_interpolated_percentile():
    w = ConfidenceWindow(size=4, k_percent=50.0, warmup_fraction=0.0)
    w.flags(T([4.0, 1.0, 3.0, 2.0]), 0, 1)
    assert w.tau == pytest.approx(2.5)  # position 0.5*3 = 1.5 between 2 and 3
    w2 = ConfidenceWindow(size=3, k_percent=10.0, warmup_fraction=0.0)
    z = w2.flags(T([0.2, 0.6, 1.0]), 0, 1)
    assert w2.tau == pytest.approx(0.2 + 0.2 * 0.4)  # position 0.1*2 = 0.2 -> 0.28
    assert z.tolist() == [1.0, 0.0, 0.0]


def test_default_window_evicts_after_50_and_flags_lowest_10_percent():
    w = ConfidenceWindow()  # size 50, K 10, warm-up 20%
    vals = torch.arange(60, dtype=torch.float64) / 100  # 0.00 .. 0.59
    for i in range(6):
        w.flags(vals[i * 10 : (i + 1) * 10], step=10 + i, total_steps=20)
    assert len(w) == 50
    assert w.values.tolist() == pytest.approx(vals[10:].tolist())  # oldest first, first 10 evicted
    # window 0.10..0.59: position 0.1*49 = 4.9 -> 0.14 + 0.9*0.01
    assert w.tau == pytest.approx(0.149)
    w2 = ConfidenceWindow()
    batch = vals[10:][torch.randperm(50, generator=torch.Generator().manual_seed(0))]  # one batch of 50, shuffled
    z = w2.flags(batch, step=5, total_steps=20)
    assert w2.tau == pytest.approx(0.149)
    assert z.sum().item() == 5  # 0.10 .. 0.14 lie below tau: 10% of the window
    assert sorted(batch[z.bool()].tolist()) == pytest.approx([0.10, 0.11, 0.12, 0.13, 0.14])


def test_batch_larger_than_window_keeps_the_last_samples():
    w = ConfidenceWindow(size=3, k_percent=50.0, warmup_fraction=0.0)
    z = w.flags(T([0.0, 0.1, 0.9, 0.5, 0.7]), 0, 1)
    assert w.values.tolist() == pytest.approx([0.9, 0.5, 0.7])
    assert w.tau == pytest.approx(0.7)
    assert z.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_warmup_gives_zero_but_window_fills():
    w = ConfidenceWindow(size=50, k_percent=50.0, warmup_fraction=0.2)
    low = T([0.01, 0.02, 0.9, 0.95])
    for step in (0, 1):  # 0.2 * 10 = 2 warm-up steps
        z = w.flags(low, step=step, total_steps=10)
        assert z.tolist() == [0.0] * 4 and z.dtype == low.dtype
    assert len(w) == 8 and w.tau is not None
    assert w.flags(low, step=2, total_steps=10).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert ConfidenceWindow(warmup_fraction=0.0).in_warmup(0, 10) is False


def test_gather_callable_sees_other_ranks_and_state_roundtrip():
    other = T([0.8, 0.9])  # the "other rank" is more confident: it raises the shared tau
    w = ConfidenceWindow(size=10, k_percent=50.0, warmup_fraction=0.0, gather=lambda t: torch.cat([t, other]))
    z = w.flags(T([0.1, 0.7]), 0, 1)
    assert w.values.tolist() == pytest.approx([0.1, 0.7, 0.8, 0.9])
    assert w.tau == pytest.approx(0.75)  # a per-rank window would give 0.4 and z = [1, 0]
    assert z.tolist() == [1.0, 1.0]
    w2 = ConfidenceWindow(size=10, k_percent=50.0)
    w2.load_state_dict(w.state_dict())
    assert w2.values.tolist() == w.values.tolist() and w2.tau == w.tau


def test_empty_local_batch_still_joins_the_window():
    w = ConfidenceWindow(size=10, k_percent=50.0, warmup_fraction=0.0, gather=lambda t: torch.cat([t, T([0.2, 0.4])]))
    z = w.flags(torch.empty(0), 0, 1)
    assert z.shape == (0,) and w.tau == pytest.approx(0.3)
    assert all_gather_1d(T([1.0, 2.0])).tolist() == [1.0, 2.0]  # no process group: identity


def test_window_errors():
    for kw, msg in [
        (dict(size=0), "size"),
        (dict(size=2.5), "size"),
        (dict(k_percent=0.0), "k_percent"),
        (dict(k_percent=100.0), "k_percent"),
        (dict(k_percent=-5), "k_percent"),
        (dict(warmup_fraction=1.0), "warmup_fraction"),
        (dict(warmup_fraction=-0.1), "warmup_fraction"),
        (dict(gather=3), "gather"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ConfidenceWindow(**kw)
    w = ConfidenceWindow()
    with pytest.raises(ValueError, match="step"):
        w.flags(T([0.5]), step=-1, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        w.flags(T([0.5]), step=0, total_steps=0)
    with pytest.raises(ValueError, match="1-D"):
        w.flags(T([[0.5]]), 0, 10)
    with pytest.raises(NonFiniteValuesError, match="finite"):  # its own type: the worker stops, not retries
        w.flags(T([float("nan")]), 0, 10)
    with pytest.raises(ValueError, match="1-D") as not_nonfinite:  # other bad input stays a plain ValueError
        w.flags(T([[0.5]]), 0, 10)
    assert not isinstance(not_nonfinite.value, NonFiniteValuesError)
    with pytest.raises(ValueError, match="floating"):
        w.flags(torch.tensor([1, 0]), 0, 10)
    with pytest.raises(ValueError, match="1-D"):
        all_gather_1d(T([[1.0]]))


# ----------------------------------------------------------------------------- real DP group
STEPS = 4
TOTAL = 10  # warm-up: steps 0 and 1


def rank_batch(rank: int, step: int) -> torch.Tensor:
    """Different confidences and batch sizes per rank (rank 1 has one more sample)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.rand(3 + rank, generator=g, dtype=torch.float32)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        w = ConfidenceWindow(size=7, k_percent=30.0, warmup_fraction=0.2, gather=all_gather_1d)
        taus, zs = [], []
        for step in range(STEPS):
            zs.append(w.flags(rank_batch(rank, step), step=step, total_steps=TOTAL))
            taus.append(w.tau)
        torch.save({"taus": taus, "zs": zs, "values": w.values}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_data_parallel_window_gloo_two_ranks(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    single = ConfidenceWindow(size=7, k_percent=30.0, warmup_fraction=0.2)
    for step in range(STEPS):
        batches = [rank_batch(r, step) for r in range(world)]
        z_all = single.flags(torch.cat(batches), step=step, total_steps=TOTAL)
        assert res[0]["taus"][step] == res[1]["taus"][step] == single.tau  # same tau on every rank
        assert torch.equal(res[0]["zs"][step], z_all[:3])
        assert torch.equal(res[1]["zs"][step], z_all[3:])
    assert torch.equal(res[0]["values"], single.values) and torch.equal(res[1]["values"], single.values)
    assert single.flags(torch.zeros(1), step=STEPS, total_steps=TOTAL).tolist() == [1.0]  # flags active after warm-up
