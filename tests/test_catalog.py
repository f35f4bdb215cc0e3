"""Head catalog: exact save/load round trips, atomic writes, run directories, head labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnlab.heads import HeadScores, Run, TokenScores, format_head, load_result, parse_head
from attnlab.heads import io as heads_io


def _head_scores(name="probe_a"):
    rng = np.random.default_rng(0)
    s = rng.random((3, 4))
    s[1, 2] = np.nan
    return HeadScores(
        scores=s,
        name=name,
        probe="p",
        params={"k": 2, "mode": "x"},
        model="m",
        dataset="abc",
        n_kv_heads=2,
        extra={"counts": np.arange(12).reshape(3, 4)},
        summary={"note": [1, 2]},
    )


def test_head_scores_round_trip_is_exact(tmp_path):
    hs = _head_scores()
    hs.save(tmp_path)
    back = HeadScores.load(tmp_path, "probe_a")
    np.testing.assert_array_equal(back.scores, hs.scores)  # NaN in the same place too
    np.testing.assert_array_equal(back.extra["counts"], hs.extra["counts"])
    for field in ("name", "probe", "params", "model", "dataset", "n_kv_heads", "summary", "created", "attnlab_version"):
        assert getattr(back, field) == getattr(hs, field), field


def test_token_scores_round_trip_is_exact(tmp_path):
    ts = TokenScores(
        tokens=["<s>", " the", " cat"],
        values=np.array([[0.1, 0.2, np.nan], [1.0, 2.0, 3.0]]),
        name="tok",
        probe="p",
        row_labels=["a", "b"],
        marks={"sink": [0]},
    )
    ts.save(tmp_path)
    back = load_result(tmp_path, "tok")
    assert isinstance(back, TokenScores)
    np.testing.assert_array_equal(back.values, ts.values)
    assert back.tokens == ts.tokens and back.marks == ts.marks and back.row_labels == ts.row_labels


def test_top_and_frames_rank_heads():
    hs = _head_scores()
    top = hs.top(3)
    assert list(top["score"]) == sorted(top["score"], reverse=True)
    assert not top["score"].isna().any()
    assert hs.top_heads(1) == [tuple(np.unravel_index(np.nanargmax(hs.scores), hs.scores.shape))]
    frame = hs.to_frame()
    assert len(frame) == 12 and set(frame.columns) >= {"layer", "head", "label", "score", "rank"}
    assert hs.per_kv_head("max").shape == (3, 2)


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    good = _head_scores("victim")
    good.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(arrays, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(heads_io, "save_file", crash)
    newer = _head_scores("victim")
    newer.scores[0, 0] = 123.0
    with pytest.raises(OSError):
        newer.save(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # old result intact, no temp files left behind
    with pytest.raises(OSError):
        _head_scores("fresh").save(tmp_path)
    assert not (tmp_path / "fresh.json").exists() and not (tmp_path / "fresh.safetensors").exists()


def test_run_directory_lists_its_results(tmp_path):
    run = Run.create(tmp_path / "run", model={"name": "m"})
    run.add(_head_scores("a"))
    run.add(_head_scores("b"))
    reopened = Run.open(tmp_path / "run")
    assert reopened.names() == ["a", "b"]
    np.testing.assert_array_equal(reopened["a"].scores, _head_scores().scores)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["info"]["model"] == {"name": "m"}


def test_no_pickle_in_saved_files(tmp_path):
    _head_scores().save(tmp_path)
    for p in tmp_path.iterdir():
        assert b"\x80\x04" not in p.read_bytes()[:2]


def test_head_labels():
    assert format_head(3, 7) == "L3H7"
    assert parse_head("L3H7") == (3, 7) == parse_head("3-7")
    with pytest.raises(ValueError):
        parse_head("layer three")


def test_token_strip_scales_rows_and_keeps_overlapping_marks():
    """Rows on different scales each reach their own maximum colour; raw values stay in the hover; a token with
    two marks shows both (each mark is its own trace)."""
    ts = TokenScores(
        tokens=["a", "b", "c", "d"],
        values=np.array([[0.0, 2.0, 4.0, 8.0], [0.001, 0.004, 0.0, -0.002]]),
        name="tok",
        probe="p",
        row_labels=["WAAD", "FAI"],
        marks={"preplan": [1, 2], "anchor": [2]},
    )
    fig = ts.plot()
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    assert np.allclose(np.abs(z).max(axis=1), 1.0)
    assert np.allclose(np.asarray(heat.customdata, dtype=float), ts.values)
    traces = {t.name: list(t.x) for t in fig.data[1:]}
    assert traces == {"preplan": ["1:b", "2:c"], "anchor": ["2:c"]}
    assert fig.data[1].marker.size > fig.data[2].marker.size  # the first mark is drawn larger, under the second
    from attnlab.figures import token_strip

    assert np.allclose(np.asarray(token_strip(ts, row_scale=False).data[0].z, dtype=float), ts.values)
