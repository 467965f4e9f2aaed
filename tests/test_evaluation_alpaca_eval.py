"""spa_ray.evaluation.alpaca_eval: AlpacaEval JSON round trip, atomic write."""

from __future__ import annotations

import json
import os

import pytest

from spa_ray.evaluation.alpaca_eval import (
    alpaca_eval_records,
    read_alpaca_eval_outputs,
    write_alpaca_eval_outputs,
)


def test_round_trip(tmp_path):
    ins = ["List three colors.", "Ünïcödé — and \"quotes\"\nnewline"]
    outs = ["red, green, blue.", "ok"]
    path = write_alpaca_eval_outputs(tmp_path / "sub" / "outputs.json", ins, outs, generator="spa-iter3")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == [
        {"instruction": ins[0], "output": outs[0], "generator": "spa-iter3"},
        {"instruction": ins[1], "output": outs[1], "generator": "spa-iter3"},
    ]
    assert read_alpaca_eval_outputs(path) == data
    # no temporary file left behind
    assert sorted(os.listdir(path.parent)) == ["outputs.json"]


def test_dataset_field(tmp_path):
    recs = alpaca_eval_records(["a", "b"], ["x", "y"], "m", dataset=["helpful_base", "oasst"])
    assert [r["dataset"] for r in recs] == ["helpful_base", "oasst"]
    path = write_alpaca_eval_outputs(tmp_path / "o.json", ["a"], ["x"], "m", dataset="helpful_base")
    assert read_alpaca_eval_outputs(path)[0]["dataset"] == "helpful_base"


def test_overwrite_is_atomic_replace(tmp_path):
    path = tmp_path / "o.json"
    write_alpaca_eval_outputs(path, ["a"], ["x"], "m1")
    write_alpaca_eval_outputs(path, ["b"], ["y"], "m2")
    assert read_alpaca_eval_outputs(path) == [{"instruction": "b", "output": "y", "generator": "m2"}]


def test_validation(tmp_path):
    with pytest.raises(ValueError):
        alpaca_eval_records(["a"], ["x", "y"], "m")
    with pytest.raises(ValueError):
        alpaca_eval_records(["a"], ["x"], "")
    with pytest.raises(TypeError):
        alpaca_eval_records(["a"], [None], "m")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a"}]))
    with pytest.raises(ValueError, match="lacks"):
        read_alpaca_eval_outputs(bad)
