"""The reference tools' published files, read without code: ``attnlab import retrieval-head | duo | headvis`` turns
each into a run that ``show`` and the app open; checked against an independent parse of the real files in
``../shared/reference-outputs/`` (skipped where that folder is absent). Also: the Retrieval_Head writer's file reads
back the way the reference reads it, and ``scan --prompts`` takes a user's own needles.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from attnlab.cli import main
from attnlab.heads.formats import (
    DUO_QUERY_HEADS,
    HEADVIS_METRICS,
    duo_full_heads,
    import_duo,
    import_headvis,
    import_retrieval_head,
    write_retrieval_head_json,
)
from attnlab.heads.runs import Run

ROOT = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("ATTNLAB_REFERENCE_OUTPUTS", ROOT.parent / "shared" / "reference-outputs"))
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason=f"reference outputs not found at {REF}")


def ref_files(sub: str, pattern: str) -> list[Path]:
    return sorted((REF / sub).glob(pattern)) if REF.is_dir() else []


def ids(paths):
    return [p.parent.name if p.name == "full_attention_heads.tsv" else p.stem for p in paths]


# ---- Retrieval_Head ---------------------------------------------------------------------------------------------

RH_FILES = ref_files("retrieval_head", "*.json")


def parse_retrieval_head(path: Path) -> tuple[np.ndarray, dict]:
    """Independent parse, the reference's way: one line, keys "layer-head", mean of each list."""
    with open(path) as f:
        raw = json.loads(f.readline())
    pairs = {tuple(int(x) for x in k.split("-")): v for k, v in raw.items()}
    L = 1 + max(l for l, _ in pairs)
    H = 1 + max(h for _, h in pairs)
    grid = np.full((L, H), np.nan)
    for (l, h), v in pairs.items():
        grid[l, h] = sum(v) / len(v)
    return grid, raw


@needs_ref
@pytest.mark.parametrize("path", RH_FILES, ids=ids(RH_FILES))
def test_retrieval_head_import_matches_an_independent_parse(path, tmp_path):
    grid, raw = parse_retrieval_head(path)
    run = import_retrieval_head(path, tmp_path / "run")
    hs = Run.open(tmp_path / "run")["retrieval_heads"]
    assert hs.scores.shape == grid.shape
    np.testing.assert_allclose(hs.scores, grid, rtol=0, atol=1e-12)
    order = np.argsort(-np.nan_to_num(grid, nan=-1).ravel(), kind="stable")[:10]
    assert hs.top_heads(10) == [divmod(int(i), grid.shape[1]) for i in order]
    info = run.info["model"]
    assert (info["name"], info["n_layers"], info["n_heads"]) == (path.stem, *grid.shape)
    assert hs.summary["n_trials"] == max(len(v) for v in raw.values())


@needs_ref
def test_retrieval_head_known_values():
    if not (REF / "retrieval_head" / "Qwen1.5-14B.json").is_file():
        pytest.skip("Qwen1.5-14B.json not in the reference outputs")
    grid, _ = parse_retrieval_head(REF / "retrieval_head" / "llama-2-7b-80k.json")
    assert grid.shape == (32, 32)
    qwen, _ = parse_retrieval_head(REF / "retrieval_head" / "Qwen1.5-14B.json")
    assert qwen.shape == (40, 40) and np.nanmax(qwen) > 1.0  # no dedup in the reference: a mean can exceed 1


@needs_ref
def test_retrieval_head_file_round_trips_through_the_one_line_writer(tmp_path):
    path = RH_FILES[0]
    import_retrieval_head(path, tmp_path / "run")
    hs = Run.open(tmp_path / "run")["retrieval_heads"]
    out = tmp_path / "again.json"
    write_retrieval_head_json(out, hs)
    assert len(out.read_text().splitlines()) == 1
    with open(out) as f:
        back = json.loads(f.readline())  # how Retrieval_Head reads its files
    with open(path) as f:
        orig = json.loads(f.readline())
    assert back.keys() == orig.keys()
    k = next(k for k, v in orig.items() if any(v))
    np.testing.assert_allclose(back[k], orig[k])


def test_written_retrieval_head_file_is_one_line_for_the_reference_reader(tmp_path):
    rng = np.random.default_rng(0)
    trials = rng.random((3, 2, 4))
    path = tmp_path / "m.json"
    write_retrieval_head_json(path, trials)
    text = path.read_text()
    assert text.count("\n") == 1 and text.endswith("\n")
    with open(path) as f:
        got = json.loads(f.readline())
    assert len(got) == 8 and got["1-3"] == pytest.approx(trials[:, 1, 3].tolist())


# ---- DuoAttention -----------------------------------------------------------------------------------------------

DUO_FILES = ref_files("duo", "*/full_attention_heads.tsv")


def parse_duo(path: Path) -> np.ndarray:
    with open(path) as f:
        return np.array([[float(x) for x in row] for row in csv.reader(f, delimiter="\t") if row])


@needs_ref
@pytest.mark.parametrize("path", DUO_FILES, ids=ids(DUO_FILES))
def test_duo_import_clips_and_expands_kv_gates_to_query_heads(path, tmp_path):
    raw = parse_duo(path)
    run = import_duo(path, tmp_path / "run")
    name = path.parent.name
    H = DUO_QUERY_HEADS[name]
    gates = Run.open(tmp_path / "run")["duo_gates"]
    L, n_kv = raw.shape
    assert gates.scores.shape == (L, H) and gates.n_kv_heads == n_kv
    group = H // n_kv
    for l, h in [(0, 0), (L - 1, H - 1), (L // 2, H // 3)]:
        assert gates.scores[l, h] == min(max(raw[l, h // group], 0.0), 1.0)
    assert gates.scores.min() >= 0.0 and gates.scores.max() <= 1.0
    np.testing.assert_array_equal(gates.per_kv_head("max"), np.clip(raw, 0, 1))
    np.testing.assert_array_equal(gates.extra["kv_gates"], raw)
    assert run.info["model"] == {**run.info["model"], "name": name, "n_layers": L, "n_heads": H, "n_kv_heads": n_kv}
    cfg = json.loads((path.parent / "config.json").read_text())
    assert gates.summary["sink_size"] == cfg["sink_size"] and gates.summary["recent_size"] == cfg["recent_size"]
    full = Run.open(tmp_path / "run")["duo_full_heads"]
    np.testing.assert_array_equal(full.per_kv_head("max"), (np.clip(raw, 0, 1) >= 0.5).astype(float))


@needs_ref
def test_duo_llama2_negative_gates_are_clipped():
    path = REF / "duo" / "Llama-2-7B-32K-Instruct" / "full_attention_heads.tsv"
    if not path.is_file():
        pytest.skip("Llama-2-7B-32K-Instruct not in the reference outputs")
    raw = parse_duo(path)
    assert raw.shape == (32, 32) and raw.min() < -0.001
    assert duo_full_heads(raw, threshold=0.0).all()  # clipped to 0 first, so >= 0 everywhere


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_duo_quantile_rule_keeps_one_minus_sparsity_full(sparsity):
    gates = np.random.default_rng(1).random((8, 8))
    full = duo_full_heads(gates, sparsity=sparsity)
    assert full.mean() == pytest.approx(1 - sparsity, abs=1 / 64)
    assert (gates[full].min() >= gates[~full].max()) if full.any() and (~full).any() else True
    ties = np.full((4, 4), 0.5)  # noise breaks ties, so the quantile rule still splits equal gates
    assert duo_full_heads(ties, sparsity=0.5).mean() == pytest.approx(0.5, abs=1 / 16)
    assert not duo_full_heads(gates, sparsity=1.0).any() and duo_full_heads(gates, sparsity=0.0).all()


@needs_ref
def test_duo_cli_quantile_rule_and_unknown_model(tmp_path, capsys):
    path = DUO_FILES[0]
    out = tmp_path / "q"
    assert main(["import", "duo", str(path), "--out", str(out), "--sparsity", "0.5"]) == 0
    full = Run.open(out)["duo_full_heads"]
    assert full.summary["rule"] == "quantile" and full.summary["full_fraction"] == pytest.approx(0.5, abs=0.02)
    tsv = tmp_path / "other" / "full_attention_heads.tsv"
    tsv.parent.mkdir()
    tsv.write_text("0.5\t0.1\n1.0\t0.0\n")
    assert main(["import", "duo", str(tsv), "--out", str(tmp_path / "x")]) == 2
    assert "--n-heads" in capsys.readouterr().err
    assert main(["import", "duo", str(tsv), "--n-heads", "4", "--out", str(tmp_path / "y")]) == 0
    assert Run.open(tmp_path / "y")["duo_gates"].scores.tolist() == [[0.5, 0.5, 0.1, 0.1], [1.0, 1.0, 0.0, 0.0]]


# ---- HeadVis ----------------------------------------------------------------------------------------------------

HV_FILES = ref_files("headvis", "*.json")


@needs_ref
@pytest.mark.parametrize("path", HV_FILES, ids=ids(HV_FILES))
def test_headvis_import_has_the_six_metrics_as_head_scores(path, tmp_path):
    raw = json.loads(path.read_text())
    import_headvis(path, tmp_path / "run")
    run = Run.open(tmp_path / "run")
    assert run.names("head_scores") == list(HEADVIS_METRICS)
    cfg = raw["config"]
    shape = (cfg["num_hidden_layers"], cfg["num_attention_heads"])
    for name in HEADVIS_METRICS:
        hs = run[name]
        assert hs.scores.shape == shape
        np.testing.assert_array_equal(hs.scores, np.array(raw["metrics"][name], dtype=float))
    m = run.info["model"]
    assert (m["name"], m["n_layers"], m["n_heads"]) == (cfg["model_name"], *shape)
    assert run.info["dataset"]["seq_len"] == cfg["seq_len"] == 512


@needs_ref
def test_headvis_gpt2_known_heads(tmp_path):
    path = REF / "headvis" / "openai-community-gpt2.json"
    if not path.is_file():
        pytest.skip("GPT-2 HeadVis file absent")
    import_headvis(path, tmp_path / "run")
    run = Run.open(tmp_path / "run")
    assert run["prev_token_score"].top_heads(1) == [(4, 11)]  # GPT-2's known previous-token head
    assert run["induction_score"].top_heads(1) == [(5, 5)]  # and its best-known induction head


# ---- show and the app open imported runs --------------------------------------------------------------------------


@needs_ref
def test_show_and_app_open_imported_runs(tmp_path, capsys):
    from attnlab.apps.app import create_app
    from attnlab.apps.callbacks import headmap, runs

    runs_dir = tmp_path / "runs"
    assert main(["import", "retrieval-head", str(RH_FILES[0]), "--out", str(runs_dir / "rh")]) == 0
    assert main(["import", "duo", str(DUO_FILES[0]), "--out", str(runs_dir / "duo")]) == 0
    assert main(["import", "headvis", str(HV_FILES[0]), "--out", str(runs_dir / "hv")]) == 0
    capsys.readouterr()
    assert main(["show", str(runs_dir / "hv")]) == 0
    printed = capsys.readouterr().out
    assert "imported from headvis" in printed and "prev_token_score" in printed
    state = create_app(runs_dir).attnlab_state
    assert state.catalog.names() == ["duo", "hv", "rh"]
    for run_name, result in [("rh", "retrieval_heads"), ("duo", "duo_gates"), ("hv", "induction_score")]:
        info, head_opts, *_ = runs.run_selected(run_name, state)
        assert result in [o["value"] for o in head_opts]
        fig, msg = headmap.head_figure(run_name, result, state)
        assert (
            msg == ""
            and fig.data
            and np.asarray(fig.data[0].z).shape == state.catalog.result(run_name, result, "head_scores").scores.shape
        )


def test_import_refuses_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert main(["import", "retrieval-head", str(bad), "--out", str(tmp_path / "a")]) == 2
    bad.write_text(json.dumps({"config": {}, "metrics": {"self_attention_score": [[0.1]]}}))
    assert main(["import", "headvis", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "prev_token_score" in capsys.readouterr().err
    good = tmp_path / "rh.json"
    good.write_text(json.dumps({"0-0": [0.5], "0-1": [0.0]}))
    assert main(["import", "retrieval-head", str(good), "--out", str(tmp_path / "c")]) == 0
    assert main(["import", "retrieval-head", str(good), "--out", str(tmp_path / "c")]) == 2  # no overwrite


# ---- the retrieval probe on a user's own needles -------------------------------------------------------------------


def needle_records():
    hay = (
        "The river ran past the old mill. Children played by the water every summer. The miller kept his books "
        "in order. Nobody remembered when the wheel last turned. Rain came often in the spring."
    )
    return [
        {"haystack": hay, "needle": "The secret harbor code is 417.", "question": "What is the secret harbor code?",
         "answer": "417", "depth": 40},
        {"haystack": hay, "needle": "The secret garden code is 902.", "question": "What is the secret garden code?",
         "real_needle": "902", "depth": 80},
    ]  # fmt: skip


def test_scan_retrieval_on_a_users_needle_file(checkpoint_dir, tmp_path):
    path = tmp_path / "needles.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in needle_records()) + "\n")
    out = tmp_path / "run"
    args = ["scan", "--model", str(checkpoint_dir / "llama-gqa"), "--probes", "retrieval", "--prompts", str(path)]
    with pytest.warns(RuntimeWarning, match="none of 2 trials"):  # a random model does not answer
        assert main([*args, "--out", str(out), "--quiet"]) == 0
    hs = Run.open(out)["retrieval_heads"]
    trials = hs.summary["trials"]
    assert len(trials) == 2 and [t["depth"] for t in trials] == [40.0, 80.0]
    assert all("reason" not in t for t in trials)  # the answer's span was found in both prompts


@pytest.mark.skipif(
    not (ROOT / "attnlab/models/bundled/organism-lm").is_dir(), reason="organism-lm not bundled in this checkout"
)
def test_scan_retrieval_on_user_needles_finds_organism_lm_retrieval_heads(tmp_path):
    import attnlab
    from attnlab.datasets.niah_set import needle_prompt_set

    model = attnlab.load("organism-lm")
    ps = needle_prompt_set(model, needle_records())
    res = attnlab.scan(model, "retrieval_heads", ps, progress=False)["retrieval_heads"]
    assert res.summary["n_passed"] == 2
    assert set(res.top_heads(2)) == {(3, 10), (3, 11)}  # the organism's known retrieval heads (MODEL_CARD)
    for ids, meta, answer in zip(ps.token_ids, ps.meta, ("417", "902")):
        s, e = meta["needle_span"]
        assert model.tokenizer.decode(ids[s:e]).strip() == answer


def test_needle_records_are_validated(checkpoint_dir, tmp_path, capsys):
    path = tmp_path / "needles.jsonl"
    rec = needle_records()[0] | {"depth": 140}
    path.write_text(json.dumps(rec) + "\n")
    args = ["scan", "--model", str(checkpoint_dir / "llama-gqa"), "--probes", "retrieval", "--prompts", str(path)]
    assert main([*args, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "depth must be in [0, 100]" in capsys.readouterr().err
