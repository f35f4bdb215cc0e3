"""The intervention evaluation harness (paired bootstrap, fit/test hygiene) and ``attnlab intervene`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnlab.cli import main
from attnlab.datasets.specs import check_sets_disjoint, load_data
from attnlab.interventions.base import Intervention
from attnlab.interventions.evaluate import evaluate_intervention
from attnlab.interventions.registry import INTERVENTIONS, build
from attnlab.interventions.zerotuning import ZeroTuning
from attnlab.stats import paired_bootstrap

FIT_PAIRS = [("cat", "CAT"), ("dog", "DOG"), ("sun", "SUN"), ("map", "MAP"), ("red", "RED"), ("owl", "OWL")]
EVAL_PAIRS = [("box", "BOX"), ("pen", "PEN"), ("cup", "CUP"), ("hat", "HAT"), ("fox", "FOX")]


def write_fv(path, pairs):
    path.write_text(json.dumps([{"input": x, "output": y} for x, y in pairs]))
    return path


# ---- statistics ----------------------------------------------------------------------------------------------------


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_n():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (30, 600):
        a = (rng.random(n) < 0.6).astype(float)
        b = np.where(rng.random(n) < 0.3, 1 - a, a)  # paired: flips 30% of the items
        r = paired_bootstrap(a, b, n_boot=800, seed=1)
        for arm in ("baseline", "intervened", "diff"):
            assert r[f"{arm}_lo"] <= r[arm] <= r[f"{arm}_hi"], (n, arm, r)
        assert r["diff"] == pytest.approx(b.mean() - a.mean())
        widths[n] = {arm: r[f"{arm}_hi"] - r[f"{arm}_lo"] for arm in ("baseline", "intervened", "diff")}
        assert paired_bootstrap(a, b, n_boot=800, seed=1) == r  # seeded
        assert paired_bootstrap(a, b, n_boot=800, seed=2) != r
    for arm in ("baseline", "intervened", "diff"):
        assert widths[600][arm] < widths[30][arm] / 2  # ~ 1/sqrt(n): 4.5x narrower expected
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 0.0], [1.0])


# ---- the harness ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["classify:sentiment:test:1", "icl:uppercase:test:2"])
def test_neutral_intervention_gives_difference_zero_with_interval_zero(loaded, spec):
    m = loaded("llama-gqa")
    data = load_data(spec, n=5, seed=0)
    report = evaluate_intervention(m, ZeroTuning(1.0).fit(m), data, n_boot=200)
    metrics = {"label": ["accuracy"], "generation": ["exact_match", "invalid_rate"]}[data.kind]
    assert report.table["metric"].tolist() == metrics
    for r in report.table.itertuples():
        assert (r.diff, r.diff_lo, r.diff_hi) == (0.0, 0.0, 0.0)
        assert r.baseline == r.intervened and r.n == len(data)
    assert report.info["eval_split"]["name"] == data.name and report.info["fit_split"]["n"] == 0
    assert [it["baseline"] for it in report.items] == [it["intervened"] for it in report.items]


def test_overlapping_fit_and_eval_data_are_refused(loaded):
    m = loaded("llama-gqa")
    fit = load_data("classify:sentiment:valid", n=4, seed=0)
    zt = ZeroTuning(2.0, profile=False).fit(m, fit.items, split=fit.name)
    test = load_data("classify:sentiment:test", n=4, seed=0)
    test.items = test.items[:3] + fit.items[:1]
    with pytest.raises(ValueError, match="fit split"):
        evaluate_intervention(m, zt, test, n_boot=50)
    # prompts with different demonstrations can still share the query: the set-level check catches it
    a, b = load_data("icl:uppercase:valid:2", n=4), load_data("icl:uppercase:valid:3", n=4)
    assert not set(a.prompts) & set(b.prompts)
    with pytest.raises(ValueError, match="overlap"):
        check_sets_disjoint(a, b)
    check_sets_disjoint(a, load_data("icl:uppercase:test:2", n=4))


def test_registry_builds_with_json_values_and_rejects_bad_names():
    assert set(INTERVENTIONS) >= {"act", "zerotuning"}
    act = build("act", ["heads=[[1,2],[0,3]]", "beta=0.5", "filter_heads=false"])
    assert act.heads == [[1, 2], [0, 3]] and act.beta == 0.5 and act.filter_heads is False
    assert build("zerotuning", ["form=bias"]).form == "bias"  # not JSON: kept as a string
    from attnlab.errors import AttnlabError

    for method, pairs in [("nope", []), ("act", ["gama=2"]), ("act", ["beta"])]:
        with pytest.raises(AttnlabError):
            build(method, pairs)


# ---- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_zerotuning_on_function_vector_files(checkpoint_dir, tmp_path, capsys):
    fit = write_fv(tmp_path / "fit.json", FIT_PAIRS)
    ev = write_fv(tmp_path / "eval.json", EVAL_PAIRS)
    out = tmp_path / "run"
    rc = main(
        [
            "intervene",
            "--model",
            str(checkpoint_dir / "llama-gqa"),
            "--method",
            "zerotuning",
            "--fit",
            str(fit),
            "--eval",
            f"{ev}:1",
            "--out",
            str(out),
            "--param",
            "grid=[0.5,2.0,0.5]",
            "--param",
            "profile=false",
            "--n-boot",
            "200",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "exact_match" in printed and "invalid_rate" in printed and "fit on fit.json:0" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["fit_split"] == {"name": "fit.json:0", "n": len(FIT_PAIRS)}
    assert report["eval_split"]["name"] == "eval.json:1" and report["eval_split"]["n"] == len(EVAL_PAIRS)
    assert [r["metric"] for r in report["metrics"]] == ["exact_match", "invalid_rate"]
    assert (out / "report.csv").read_text().startswith("metric,")
    back = Intervention.load(out / "intervention")
    assert (
        isinstance(back, ZeroTuning)
        and back.gamma_ in (0.5, 1.0, 1.5, 2.0)
        and back.gamma_ == report["fitted"]["gamma"]
    )
    # the same file as fit and eval data is refused, before anything is written
    rc = main(
        [
            "intervene",
            "--model",
            str(checkpoint_dir / "llama-gqa"),
            "--method",
            "zerotuning",
            "--fit",
            str(fit),
            "--eval",
            f"{fit}:1",
            "--out",
            str(tmp_path / "bad"),
            "--param",
            "gamma=2",
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2 and "overlap" in err and err.startswith("attnlab: error:") and len(err.strip().splitlines()) == 1
    )  # refused before loading
    assert not (tmp_path / "bad").exists()


def test_cli_act_on_organism_classification(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "intervene",
            "--model",
            "organism-lm",
            "--method",
            "act",
            "--fit",
            "classify:sentiment:valid",
            "--eval",
            "classify:sentiment:test",
            "--out",
            str(out),
            "--param",
            "heads=[[3,0],[3,1],[4,2]]",
            "--param",
            "beta=0.3",
            "--n",
            "6",
            "--n-boot",
            "200",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads((out / "report.json").read_text())
    assert (
        report["fit_split"]["name"] == "classify:sentiment:valid:0"
        and report["eval_split"]["name"] == "classify:sentiment:test:0"
    )
    (row,) = report["metrics"]
    assert row["metric"] == "accuracy" and row["n"] == 6
    assert row["baseline_lo"] <= row["baseline"] <= row["baseline_hi"]
    assert len(report["fitted"]["heads"]) <= 3 and len(report["items"]) == 6
    assert Intervention.load(out / "intervention").heads_ == tuple(tuple(h) for h in report["fitted"]["heads"])


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--method", "nope", "--eval", "classify:sentiment:test"], "unknown method"),
        (["--method", "act", "--eval", "classify:sentiment:test", "--param", "gama=2"], "no parameter 'gama'"),
        (["--method", "act", "--eval", "classify:sentiment:test", "--param", "beta"], "name=value"),
        (["--method", "act", "--eval", "classify:nope:test"], "classification task"),
        (["--method", "act", "--eval", "icl:uppercase:later"], "split"),
        (["--method", "act", "--eval", "missing.json"], "neither"),
        (["--method", "zerotuning", "--eval", "classify:sentiment:test"], "gamma=None"),
        (["--method", "zerotuning", "--eval", "classify:sentiment:test", "--param", "gamma=-1"], "gamma must be"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(checkpoint_dir, tmp_path, capsys, extra, needle):
    rc = main(
        ["intervene", "--model", str(checkpoint_dir / "llama-gqa"), "--out", str(tmp_path / "run"), "--n", "2", *extra]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [
        line for line in err.strip().splitlines() if line.startswith("attnlab:")
    ]  # (the loader may draw a progress bar)
    assert lines == [err.strip().splitlines()[-1]] and lines[0].startswith("attnlab: error:") and needle in lines[0]


def test_cli_vision_interventions_on_pope_questions(checkpoint_dir, tmp_path, capsys):
    """`pope:SPLIT[:SEED]` gives VLM yes/no questions with their images, so `intervene --method vhr|var` runs from
    the command line; the same scenes as fit and eval data are refused; a text model says it takes no images."""
    from attnlab.datasets.specs import load_data

    a, b = load_data("pope:random:1", n=6), load_data("pope:random:2", n=6)
    assert a.kind == "label" and len(a) == 6 and all(it.image is not None and "<image>" in it.prompt for it in a.items)
    assert {it.label for it in a.items} == {"yes", "no"}
    assert not set(a.prompts) & set(b.prompts)  # the same question text about other scenes is another item
    llava = str(checkpoint_dir / "llava")
    for method, params in (("vhr", ["--param", "alpha=2"]), ("var", ["--param", "p=0.4", "--param", "tau=0.5"])):
        out = tmp_path / method
        rc = main(
            [
                "intervene",
                "--model",
                llava,
                "--method",
                method,
                "--fit",
                "pope:random:1",
                "--eval",
                "pope:adversarial:2",
                "--n",
                "6",
                "--n-boot",
                "100",
                "--out",
                str(out),
                *params,
            ]
        )
        printed = capsys.readouterr().out
        assert rc == 0, printed
        report = json.loads((out / "report.json").read_text())
        assert report["fit_split"]["name"] == "pope:random:1" and report["eval_split"] == {
            **report["eval_split"],
            "name": "pope:adversarial:2",
            "n": 6,
        }
        assert [r["metric"] for r in report["metrics"]] == ["accuracy"]
    rc = main(
        [
            "intervene",
            "--model",
            llava,
            "--method",
            "vhr",
            "--fit",
            "pope:random:1",
            "--eval",
            "pope:random:1",
            "--n",
            "6",
            "--out",
            str(tmp_path / "same"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "overlap" in err and len(err.strip().splitlines()) == 1
    rc = main(
        [
            "intervene",
            "--model",
            str(checkpoint_dir / "gpt2"),
            "--method",
            "act",
            "--param",
            "beta=1",
            "--eval",
            "pope:random:3",
            "--n",
            "4",
            "--out",
            str(tmp_path / "text"),
        ]
    )
    err = capsys.readouterr().err
    ours = [
        line for line in err.splitlines() if line.startswith("attnlab: error")
    ]  # (transformers' loading bar also writes to stderr; ACT's note that it edits no head of a 2-layer model too)
    assert rc == 2 and len(ours) == 1 and "takes no images" in ours[0] and "Traceback" not in err
