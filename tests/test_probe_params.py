"""``attnlab scan|census --param PROBE.NAME=VALUE`` (issue #15's follow-up): the value reaches the probe and changes
what it finds (organism-sink's BOS residual peak is ~13x its median entry, flagged at ratio 10 and not at the default
1000), the run records it, ``show`` and the app's titles name it, and every bad form is one line, exit 2, with
nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHORT_SENTENCES
from test_bad_input import assert_user_error

from attnlab.cli import main

SINK = Path(__file__).resolve().parents[1] / "attnlab" / "models" / "bundled" / "organism-sink"
shipped = pytest.mark.skipif(not (SINK / "config.json").is_file(), reason="organism-sink not shipped")
RATIO = "massive_activations.ratio_threshold=10"

pytestmark = pytest.mark.usefixtures("one_thread")


def sink_scan(out: Path, *extra: str) -> int:
    return main(
        [
            "scan",
            "--model",
            "organism-sink",
            "--probes",
            "massive_activations",
            "--dataset",
            "bigram-backcopy",
            "--n-prompts",
            "2",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def sink_runs(tmp_path_factory):
    """organism-sink scanned for massive activations with the default ratio and with --param ratio 10."""
    root = tmp_path_factory.mktemp("sink-params")
    assert sink_scan(root / "default") == 0
    assert sink_scan(root / "ratio10", "--param", RATIO) == 0
    return root


@shipped
def test_ratio_threshold_reaches_the_probe_and_flags_bos_only_with_it(sink_runs):
    default = json.loads((sink_runs / "default" / "massive_activations_0.json").read_text())
    ratio10 = json.loads((sink_runs / "ratio10" / "massive_activations_0.json").read_text())
    assert default["params"]["ratio_threshold"] == 1000.0 and default["marks"]["massive"] == []
    assert default["summary"]["massive_tokens"] == {}
    assert ratio10["params"]["ratio_threshold"] == 10.0  # an int on the command line, the float the probe documents
    assert ratio10["marks"]["massive"] == [0]  # BOS, and nothing else, in the tokens view
    assert set(ratio10["summary"]["massive_tokens"]) == {ratio10["tokens"][0]}
    probes = json.loads((sink_runs / "ratio10" / "run.json").read_text())["info"]["probes"]
    assert [p["params"]["ratio_threshold"] for p in probes if p["name"] == "massive_activations"] == [10.0]


@shipped
def test_show_and_the_app_name_the_parameter_set(sink_runs, capsys):
    from attnlab import figures
    from attnlab.heads.runs import Run

    assert main(["show", str(sink_runs / "ratio10")]) == 0
    assert "probe parameters: massive_activations.ratio_threshold=10.0" in capsys.readouterr().out
    assert main(["show", str(sink_runs / "default")]) == 0
    assert "probe parameters" not in capsys.readouterr().out
    title = figures.token_strip(Run.open(sink_runs / "ratio10")["massive_activations_0"]).layout.title.text
    assert "(ratio_threshold=10.0)" in title
    title = figures.token_strip(Run.open(sink_runs / "default")["massive_activations_0"]).layout.title.text
    assert "ratio_threshold" not in title


@shipped
def test_census_takes_the_same_param(tmp_path):
    out = tmp_path / "census"
    args = ["census", "--model", "organism-sink", "--dataset", "bigram-backcopy", "--n-prompts", "2"]
    args += ["--statistics", "massive_activations", "--out", str(out), "--quiet", "--param", RATIO]
    assert main(args) == 0
    tokens = json.loads((out / "massive_activations_0.json").read_text())
    assert tokens["params"]["ratio_threshold"] == 10.0 and tokens["marks"]["massive"] == [0]


@shipped
def test_resume_keeps_the_recorded_parameter_and_refuses_another(sink_runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(sink_runs / "ratio10", run)
    index = json.loads((run / "run.json").read_text())
    index["pending"], index["status"] = ["massive_activations"], "incomplete"  # as if interrupted before it finished
    (run / "run.json").write_text(json.dumps(index))
    for f in run.glob("massive_activations_0.*"):
        f.unlink()
    assert_user_error(
        ["scan", "--model", "organism-sink", "--dataset", "bigram-backcopy", "--n-prompts", "2", "--out", run,
         "--resume", "--param", "massive_activations.ratio_threshold=20"],
        capsys,
        "a resumed scan keeps its parameters",
    )  # fmt: skip
    assert sink_scan(run, "--resume") == 0
    tokens = json.loads((run / "massive_activations_0.json").read_text())
    assert tokens["params"]["ratio_threshold"] == 10.0 and tokens["marks"]["massive"] == [0]


# ---- bad forms: one line, exit 2, nothing written -----------------------------------------------------------------

BAD = [
    ("massive_activations.ratio_threshold", "PROBE.NAME=VALUE"),
    ("ratio_threshold=10", "PROBE.NAME=VALUE"),
    ("induction.foo=1", "'induction' is not among the probes run here"),
    ("nosuch.x=1", "'nosuch' is not a probe"),
    ("massive_activations.nope=1", "massive_activations has no parameter 'nope'; parameters: abs_threshold"),
    ("massive_activations.ratio_threshold=abc", "must be a number, got abc"),
    ("massive_activations.ratio_threshold=true", "must be a number, got true"),
    ("massive_activations.ratio_threshold=[10]", "must be a number, true/false or a string"),
    ("massive_activations.ratio_threshold=[1,", "cannot read '[1,'"),
    ("massive_activations.ratio_threshold=10x", "cannot read '10x'"),
    ("massive_activations.ratio_threshold=NaN", "NaN is not a finite number"),
    ("massive_activations.ratio_threshold=1e999", "1e999 is not a finite number"),
    ("massive_activations.ratio_threshold=", "no value after '='"),
    ("massive_activations.n_examples=1.5", "must be an integer, got 1.5"),
    ("act_sinks.threshold_mode=bogus", "act_sinks: threshold_mode must be 'fixed' or 'alpha_over_n'"),
]


@pytest.mark.parametrize("pair,expect", BAD, ids=[b[0] for b in BAD])
def test_a_bad_param_is_refused_before_loading(pair, expect, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["scan", "--model", tmp_path / "no-such-model", "--probes", "sinks", "--prompts", tmp_path / "none.txt"]
    assert_user_error([*args, "--out", out, "--param", pair], capsys, expect)  # the model is never looked for
    assert not out.exists()


def test_a_param_given_twice_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["scan", "--model", tmp_path / "m", "--probes", "sinks", "--prompts", tmp_path / "p.txt", "--out", out]
    assert_user_error([*args, "--param", RATIO, "--param", RATIO], capsys, "ratio_threshold given twice")
    assert not out.exists()


def test_census_refuses_a_param_for_a_probe_its_statistics_do_not_run(tmp_path, capsys):
    out = tmp_path / "census"
    args = ["census", "--model", tmp_path / "m", "--dataset", "prose", "--statistics", "sinks", "--out", out]
    assert_user_error([*args, "--param", "induction.foo=1"], capsys, "'induction' is not among the probes run here")
    assert not out.exists()


@pytest.mark.parametrize(
    "pair,expect",
    [
        ("massive_activations.ratio_threshold=-1", "massive_activations: ratio_threshold must be a finite number > 0"),
        ("first_token_sink.n_sink_tokens=0", "first_token_sink: n_sink_tokens must be >= 1"),
    ],
)
@pytest.mark.parametrize("command", ["scan", "census"])
def test_a_value_the_probe_refuses_when_it_attaches_writes_nothing(
    command, pair, expect, checkpoint_dir, tmp_path, capsys
):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(SHORT_SENTENCES[:2]))
    out = tmp_path / "run"
    args = [command, "--model", checkpoint_dir / "llama-gqa", "--prompts", prompts, "--out", out, "--quiet"]
    args += ["--probes", "sinks"] if command == "scan" else ["--statistics", "sinks"]
    assert_user_error([*args, "--param", pair], capsys, expect)
    assert not out.exists()


@pytest.mark.parametrize("command", ["scan", "census"])
def test_help_lists_the_param_option(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--param PROBE.NAME=VALUE" in text and "massive_activations.ratio_threshold=10" in text


def test_scan_api_params_reach_a_named_probe_and_stray_ones_are_refused(loaded):
    """Planted: at ratio 1 and abs 0 every position's largest entry is massive (max >= 1 x median); the defaults flag
    nothing in a tiny random model. Parameters for a probe the scan does not build by name are an error."""
    import attnlab
    from attnlab.errors import AttnlabError

    model = loaded("llama-gqa")
    every = {"massive_activations": {"ratio_threshold": 1.0, "abs_threshold": 0.0}}
    flagged = attnlab.scan(model, "massive_activations", SHORT_SENTENCES[:1], params=every, progress=False)
    plain = attnlab.scan(model, "massive_activations", SHORT_SENTENCES[:1], progress=False)
    n = len(flagged["massive_activations_0"].tokens)
    assert flagged["massive_activations_0"].marks["massive"] == list(range(n))
    assert plain["massive_activations_0"].marks["massive"] == []
    with pytest.raises(AttnlabError, match="parameters given for induction"):
        attnlab.scan(model, "massive_activations", SHORT_SENTENCES[:1], params={"induction": {}}, progress=False)
