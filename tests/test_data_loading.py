"""Loading UltraFeedback-format files (JSONL, parquet, directories) and every validation
error: each must name the file, the 0-based row and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spa_ray.data import DataError, PreferencePair, load_prompts, load_ultrafeedback, pairs_from_rows
from spa_ray.data.ultrafeedback import resolve_files

try:
    from tests._tiny_tokenizer import make_tiny_tokenizer
except ImportError:  # tests/ on sys.path (rootdir-less import mode)
    from _tiny_tokenizer import make_tiny_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "ultrafeedback_tiny.jsonl"
N_FIXTURE = 40


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "hf_cache")


def assert_located(err: DataError, path: Path | str, row: int | None, field: str | None) -> None:
    msg = str(err)
    name = Path(path).name
    assert name in msg, msg
    assert err.file is not None and err.file.endswith(name)
    if row is not None:
        assert f"row {row}" in msg, msg
        assert err.row == row
    if field is not None:
        assert f"'{field}'" in msg, msg
        assert err.field == field


# ----------------------------------------------------------------------------- happy paths


def test_fixture_has_the_argilla_format():
    rows = fixture_rows()
    assert len(rows) == N_FIXTURE
    keys = {"source", "prompt", "chosen", "chosen-rating", "chosen-model", "rejected", "rejected-rating", "rejected-model"}
    for r in rows:
        assert set(r) == keys
        for side in ("chosen", "rejected"):
            assert [m["role"] for m in r[side]] == ["user", "assistant"]
            assert r[side][0]["content"] == r["prompt"]
    assert len({r["prompt"] for r in rows}) == N_FIXTURE


def test_load_fixture_jsonl(cache):
    data = load_ultrafeedback(FIXTURE, cache_dir=cache)
    assert len(data) == N_FIXTURE
    assert data.stats.rows_read == N_FIXTURE and data.stats.kept == N_FIXTURE
    assert data.stats.duplicates_dropped == 0 and data.stats.files == [str(FIXTURE)]
    raw = fixture_rows()
    for i, (p, r) in enumerate(zip(data, raw)):
        assert isinstance(p, PreferencePair)
        assert p.row == i and p.file == str(FIXTURE)
        assert p.prompt == r["prompt"]
        assert p.chosen == r["chosen"][-1]["content"]
        assert p.rejected == r["rejected"][-1]["content"]
        assert p.chosen_score == r["chosen-rating"] and p.rejected_score == r["rejected-rating"]
        assert p.chosen_model == r["chosen-model"] and p.source == r["source"]
    assert PreferencePair.from_dict(data[0].to_dict()) == data[0]


def test_load_parquet_written_from_the_jsonl(tmp_path, cache):
    pq_path = write_parquet(tmp_path / "uf.parquet", fixture_rows())
    from_pq = load_ultrafeedback(pq_path, cache_dir=cache)
    from_jsonl = load_ultrafeedback(FIXTURE, cache_dir=cache)
    strip = lambda p: (p.prompt, p.chosen, p.rejected, p.row, p.chosen_score, p.rejected_model)  # noqa: E731
    assert [strip(p) for p in from_pq] == [strip(p) for p in from_jsonl]


def test_load_directory_keeps_per_file_rows(tmp_path, cache):
    rows = fixture_rows()
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", rows[:15])
    write_parquet(d / "b.parquet", rows[15:])
    (d / "README.md").write_text("ignored")
    data = load_ultrafeedback(d, cache_dir=cache)
    assert len(data) == N_FIXTURE
    assert [Path(f).name for f in data.stats.files] == ["a.jsonl", "b.parquet"]
    assert data[15].row == 0 and data[15].file.endswith("b.parquet")
    assert data[14].row == 14 and data[14].file.endswith("a.jsonl")


def test_string_format_and_system_message_and_h4_scores(tmp_path, cache):
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "score_chosen": 8.0, "score_rejected": 2.0},
        {
            "prompt": "Be brief: what is 2+2?",
            "chosen": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Be brief: what is 2+2?"},
                {"role": "assistant", "content": "4"},
            ],
            "rejected": [{"role": "assistant", "content": "Five."}],
            "score_chosen": 9.0,
            "score_rejected": 1.0,
        },
    ]
    data = load_ultrafeedback(write_jsonl(tmp_path / "s.jsonl", rows), cache_dir=cache)
    assert [(p.chosen, p.rejected) for p in data] == [("Hi!", "No."), ("4", "Five.")]
    assert data[0].chosen_score == 8.0 and data[1].rejected_score == 1.0


def test_blank_lines_do_not_shift_row_indices(tmp_path, cache):
    rows = fixture_rows()[:4]
    rows[3]["chosen"][1]["content"] = ""
    path = tmp_path / "blank.jsonl"
    path.write_text("\n".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # blank line between rows
    with pytest.raises(DataError) as ei:
        load_ultrafeedback(path, cache_dir=cache)
    assert_located(ei.value, path, 3, "chosen")


def test_duplicates_keep_first_and_counted(tmp_path, cache):
    rows = fixture_rows()[:10]
    dup = json.loads(json.dumps(rows[2]))
    dup["chosen"][1]["content"] = "A different answer."
    dup["prompt"] = rows[2]["prompt"] + "  "  # surrounding whitespace is not identity
    for side in ("chosen", "rejected"):
        dup[side][0]["content"] = dup["prompt"]
    rows = rows + [dup, rows[5]]
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    data = load_ultrafeedback(path, cache_dir=cache)
    assert len(data) == 10
    assert data.stats.duplicates_dropped == 2 and data.stats.rows_read == 12
    assert data.stats.duplicate_rows == [(str(path), 10), (str(path), 11)]
    assert data[2].chosen == rows[2]["chosen"][1]["content"]  # the first one is kept
    with pytest.raises(DataError) as ei:
        load_ultrafeedback(path, cache_dir=cache, duplicates="error")
    assert_located(ei.value, path, 10, "prompt")
    assert "row 2" in str(ei.value)


def test_limit_and_load_prompts(tmp_path, cache):
    assert len(load_ultrafeedback(FIXTURE, cache_dir=cache, limit=7)) == 7
    prompts = load_prompts(FIXTURE, cache_dir=cache)
    assert [p.prompt for p in prompts] == [r["prompt"] for r in fixture_rows()]
    only = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a?"}, {"prompt": "b?"}, {"prompt": "a?"}])
    lp = load_prompts(only, cache_dir=cache)
    assert [p.prompt for p in lp] == ["a?", "b?"] and lp.stats.duplicates_dropped == 1


def test_pairs_from_rows_validates_in_memory():
    rows = fixture_rows()[:3]
    assert len(pairs_from_rows(rows)) == 3
    rows[1]["rejected"] = 5
    with pytest.raises(DataError) as ei:
        pairs_from_rows(rows, file="mem.jsonl")
    assert_located(ei.value, "mem.jsonl", 1, "rejected")


# ----------------------------------------------------------------------------- malformed rows


def _del_column(rows, col):
    for r in rows:
        del r[col]


def _set_content(i, side, value, msg=1):
    def f(rows):
        rows[i][side][msg]["content"] = value
    return f


def _set(i, key, value):
    def f(rows):
        rows[i][key] = value
    return f


def _roles(i, side, roles):
    def f(rows):
        for m, role in zip(rows[i][side], roles):
            m["role"] = role
    return f


def _del_key(i, key):
    def f(rows):
        del rows[i][key]
    return f


MALFORMED = [
    # (id, mutation, row, field)
    ("missing_column", lambda rows: _del_column(rows, "rejected"), 0, "rejected"),
    ("missing_in_one_row", _del_key(7, "chosen"), 7, "chosen"),
    ("empty_response", _set_content(5, "chosen", "   "), 5, "chosen"),
    ("empty_prompt", _set(2, "prompt", ""), 2, "prompt"),
    ("non_string_prompt", _set(2, "prompt", 42), 2, "prompt"),
    ("non_string_content", _set_content(3, "chosen", 123), 3, "chosen"),
    ("null_content", _set_content(9, "rejected", None), 9, "rejected"),
    ("response_not_str_or_list", _set(10, "rejected", 3.5), 10, "rejected"),
    ("wrong_role_layout", _roles(4, "rejected", ["assistant", "user"]), 4, "rejected"),
    ("unknown_role", _roles(4, "chosen", ["user", "bot"]), 4, "chosen"),
    ("user_turn_differs_from_prompt", _set_content(6, "chosen", "another question", msg=0), 6, "chosen"),
    ("empty_message_list", _set(11, "chosen", []), 11, "chosen"),
    ("bad_rating", _set(12, "chosen-rating", "five"), 12, "chosen-rating"),
]


@pytest.mark.parametrize("mutate,row,field", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_jsonl_rows_are_located(tmp_path, cache, mutate, row, field):
    rows = fixture_rows()
    mutate(rows)
    path = write_jsonl(tmp_path / "broken_rows.jsonl", rows)
    with pytest.raises(DataError) as ei:
        load_ultrafeedback(path, cache_dir=cache)
    assert isinstance(ei.value, ValueError)
    assert_located(ei.value, path, row, field)


@pytest.mark.parametrize(
    "mutate,row,field",
    [(_set_content(8, "rejected", ""), 8, "rejected"), (lambda rows: _del_column(rows, "prompt"), 0, "prompt")],
    ids=["empty_response", "missing_column"],
)
def test_malformed_parquet_rows_are_located(tmp_path, cache, mutate, row, field):
    rows = fixture_rows()
    mutate(rows)
    path = write_parquet(tmp_path / "broken.parquet", rows)
    with pytest.raises(DataError) as ei:
        load_ultrafeedback(path, cache_dir=cache)
    assert_located(ei.value, path, row, field)


def test_bad_encoding_names_file_and_row(tmp_path, cache):
    lines = FIXTURE.read_bytes().splitlines(keepends=True)
    lines[8] = lines[8][:30] + b"\xe9" + lines[8][30:]  # a Latin-1 byte in row 8
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"".join(lines))
    with pytest.raises(DataError) as ei:
        load_ultrafeedback(path, cache_dir=cache)
    assert_located(ei.value, path, 8, None)
    assert "UTF-8" in str(ei.value) and "line 9" in str(ei.value)


def test_utf16_file_is_rejected_clearly(tmp_path, cache):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes(FIXTURE.read_text(encoding="utf-8").encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16") as ei:
        load_ultrafeedback(path, cache_dir=cache)
    assert_located(ei.value, path, None, None)


def test_invalid_json_line_is_located(tmp_path, cache):
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    lines[13] = lines[13][:-5]
    path = tmp_path / "truncated.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON") as ei:
        load_ultrafeedback(path, cache_dir=cache)
    assert_located(ei.value, path, 13, None)


def test_empty_and_missing_and_unsupported_files(tmp_path, cache):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no rows") as ei:
        load_ultrafeedback(empty, cache_dir=cache)
    assert_located(ei.value, empty, None, None)
    with pytest.raises(DataError, match="no such file"):
        load_ultrafeedback(tmp_path / "nope.jsonl", cache_dir=cache)
    csv = tmp_path / "x.csv"
    csv.write_text("prompt\n")
    with pytest.raises(DataError, match="unsupported"):
        load_ultrafeedback(csv, cache_dir=cache)
    (tmp_path / "nodata").mkdir()
    with pytest.raises(DataError, match="no .*files"):
        load_ultrafeedback(tmp_path / "nodata", cache_dir=cache)


def test_hub_ids_are_passed_through_not_resolved_locally():
    # A hub id is not a local path: the loader hands it to datasets.load_dataset untouched
    # (that needs network, which tests do not have, so only the resolution is tested).
    assert resolve_files("argilla/ultrafeedback-binarized-preferences-cleaned") is None
    assert resolve_files(FIXTURE) == [FIXTURE]


# ----------------------------------------------------------------------------- over-long rows


def test_overlong_rows_error_skip_keep(tmp_path, cache):
    tok = make_tiny_tokenizer()
    rows = fixture_rows()
    rows[17]["rejected"][1]["content"] = "very long answer " * 200
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    kw = dict(tokenizer=tok, max_prompt_len=128, max_total_len=256, cache_dir=cache)
    with pytest.raises(DataError) as ei:
        load_ultrafeedback(path, **kw)
    assert_located(ei.value, path, 17, "rejected")
    assert "max_total_len=256" in str(ei.value)

    skipped = load_ultrafeedback(path, on_overlong="skip", **kw)
    assert len(skipped) == N_FIXTURE - 1 and skipped.stats.overlong_skipped == 1
    assert skipped.stats.overlong_rows == [(str(path), 17, "rejected")]
    assert rows[17]["prompt"] not in {p.prompt for p in skipped}

    kept = load_ultrafeedback(path, on_overlong="keep", **kw)
    assert len(kept) == N_FIXTURE and kept.stats.overlong_kept == 1

    rows[3]["prompt"] = "why " * 300
    for side in ("chosen", "rejected"):
        rows[3][side][0]["content"] = rows[3]["prompt"]
    path2 = write_jsonl(tmp_path / "longprompt.jsonl", rows)
    with pytest.raises(DataError) as ei:
        load_ultrafeedback(path2, **kw)
    assert_located(ei.value, path2, 3, "prompt")


def test_fixture_fits_paper_lengths(cache):
    tok = make_tiny_tokenizer()
    data = load_ultrafeedback(FIXTURE, tokenizer=tok, max_prompt_len=1024, max_total_len=2048, cache_dir=cache)
    assert len(data) == N_FIXTURE and data.stats.overlong_rows == []


def test_length_limits_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        load_ultrafeedback(FIXTURE, max_total_len=10)


def test_data_error_is_a_picklable_value_error():
    import pickle

    e = DataError("empty response", file="a.jsonl", row=3, field="chosen")
    e2 = pickle.loads(pickle.dumps(e))
    assert isinstance(e2, ValueError) and str(e2) == str(e) == "file a.jsonl, row 3, field 'chosen': empty response"
    assert (e2.file, e2.row, e2.field, e2.reason) == ("a.jsonl", 3, "chosen", "empty response")
