"""A researcher's own data, end to end (issue #17), without a browser: runs keep their inputs (texts, token ids,
images by digest) and can be re-opened, re-scored and shared; a run is never mixed with another model's; probes
that score nothing say why; an intervention that edits no heads says so; long commands show progress; ``ablate``
takes the user's prompts; each probe runs once; streaming heads are ranked by what the statistic means."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SHORT_SENTENCES

import attnlab
from attnlab.cli import main
from attnlab.errors import AttnlabError
from attnlab.heads.runs import Run
from attnlab.models.bundled import bundled_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts_file(tmp_path, lines=SHORT_SENTENCES[:3]):
    path = tmp_path / "my_prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _scan(model, out, *extra, probes="first_token_sink"):
    return main(["scan", "--model", str(model), "--probes", probes, "--out", str(out), "--quiet", *extra])


# ---- 3. a run keeps its inputs ------------------------------------------------------------------------------------


def test_prompts_file_run_keeps_its_texts_and_token_ids(checkpoint_dir, tmp_path, loaded, capsys):
    prompts = _prompts_file(tmp_path)
    out = tmp_path / "run"
    assert _scan(checkpoint_dir / "gpt2", out, "--prompts", str(prompts)) == 0
    run = Run.open(out)
    kept = run.inputs()
    model = loaded("gpt2")
    assert kept is not None and kept.texts == SHORT_SENTENCES[:3] and kept.name == "my_prompts.txt"
    assert kept.token_ids == [model.token_ids(t) for t in SHORT_SENTENCES[:3]]  # exactly what the model saw
    assert kept.fingerprint == run.info["dataset"]["fingerprint"] == run["first_token_sink"].dataset
    assert run.info["inputs"]["n_prompts"] == 3
    # the prompts file can go: the run is re-scored from what it kept, to the same numbers
    prompts.unlink()
    again = attnlab.scan(model, "first_token_sink", kept.prompt_set(), progress=False)
    np.testing.assert_array_equal(again["first_token_sink"].scores, run["first_token_sink"].scores)
    assert again["first_token_sink"].dataset == kept.fingerprint


def test_image_prompts_are_kept_by_content_digest(loaded, tmp_path):
    from attnlab.datasets import shape_prompt_set
    from attnlab.heads.inputs import image_digest, load_inputs

    model = loaded("llava")
    ps = shape_prompt_set("attribute", 3, 0)
    ps.images[2] = ps.images[0].copy()  # the same picture twice is stored once
    attnlab.scan(model, "first_token_sink", ps, out=tmp_path / "vlm", progress=False)
    kept = load_inputs(tmp_path / "vlm")
    files = sorted(p.name for p in (tmp_path / "vlm" / "images").iterdir())
    assert files == sorted({f"{image_digest(im)}.png" for im in ps.images}) and len(files) == 2
    for i, im in enumerate(ps.images):
        assert np.array_equal(np.asarray(kept.image(i)), np.asarray(im))  # lossless
    batch = model.encode(ps.texts, images=ps.images)
    assert kept.token_ids == [batch.input_ids[i, batch.real_slice(i)].tolist() for i in range(3)]  # image expanded
    assert kept.meta == [dict(m) for m in ps.meta] and kept.texts == ps.texts
    # a changed image is refused by its digest, not silently shown
    from PIL import Image

    path = tmp_path / "vlm" / "images" / files[0]
    Image.new("RGB", (64, 64), "white").save(path)
    bad = next(i for i, im in enumerate(ps.images) if f"{image_digest(im)}.png" == files[0])
    with pytest.raises(AttnlabError, match="does not match its digest"):
        load_inputs(tmp_path / "vlm").image(bad)


def test_kept_inputs_are_checked_when_read(tmp_path):
    from attnlab.datasets import PromptSet
    from attnlab.heads.inputs import load_inputs, save_inputs

    save_inputs(tmp_path, PromptSet(name="p", token_ids=[[1, 2, 3], [4, 5]]), [[1, 2, 3], [4, 5]])
    assert load_inputs(tmp_path).token_ids == [[1, 2, 3], [4, 5]]
    rec = json.loads((tmp_path / "inputs.json").read_text())
    rec["fingerprint"] = "0" * 16
    (tmp_path / "inputs.json").write_text(json.dumps(rec))
    with pytest.raises(AttnlabError, match="do not match their fingerprint"):
        load_inputs(tmp_path)
    assert load_inputs(tmp_path / "nowhere") is None  # a run written before runs kept their inputs


def test_a_copied_run_is_read_where_it_lands(checkpoint_dir, tmp_path, loaded):
    """A run directory is self-contained: copied elsewhere, the app reads its prompts from it."""
    from attnlab.apps.app import create_app
    from attnlab.apps.callbacks import pattern
    from attnlab.apps.live import LiveModels

    out = tmp_path / "made" / "run"
    assert _scan(checkpoint_dir / "gpt2", out, "--prompts", str(_prompts_file(tmp_path))) == 0
    shared = tmp_path / "colleague" / "runs"
    shutil.copytree(out, shared / "run")
    shutil.rmtree(tmp_path / "made")
    live = LiveModels()
    model = loaded("gpt2")
    live.preload(model.name, model)
    state = create_app(shared, live_model=live).attnlab_state
    fig, msg = pattern.pattern_figure("run", {"layer": 1, "head": 2}, "2", None, 0, None, state)
    assert msg == "" and fig.layout.meta["n_tokens"] == len(model.token_ids(SHORT_SENTENCES[2]))


# ---- 4. the model is loaded by what the scan was given -------------------------------------------------------------


def test_model_to_load_is_the_alias_hub_id_or_absolute_path(tmp_path):
    from attnlab.apps.run_inputs import model_to_load

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert model_to_load({"model": {"name": "organism-lm", "path": "/x/bundled/organism-lm"}}) == "organism-lm"
    assert model_to_load({"model": {"name": "ckpt", "path": str(ckpt)}}) == str(ckpt)  # a relative path given
    hub = tmp_path / "hub" / "models--gpt2" / "snapshots" / "abc"
    hub.mkdir(parents=True)
    assert model_to_load({"model": {"name": "gpt2", "path": str(hub)}}) == "gpt2"  # a cached hub id
    assert model_to_load({"model": {"name": "org/model", "path": "org/model"}}) == "org/model"


# ---- 5. a run is one model on one set of inputs --------------------------------------------------------------------


def test_scan_refuses_to_mix_another_model_into_a_run(checkpoint_dir, tmp_path, capsys):
    prompts = _prompts_file(tmp_path)
    out = tmp_path / "run"
    assert _scan(checkpoint_dir / "llama-gqa", out, "--prompts", str(prompts)) == 0
    before = sorted(p.name for p in out.iterdir())
    index = (out / "run.json").read_text()
    capsys.readouterr()
    for extra in ((), ("--append",)):
        assert _scan(checkpoint_dir / "gpt2", out, "--prompts", str(prompts), *extra, probes="induction") == 2
        err = capsys.readouterr().err.strip().splitlines()
        ours = [line for line in err if line.startswith("attnlab:")]
        assert len(ours) == 1 and "error" in ours[0] and "Traceback" not in "\n".join(err)
        assert ("--append" in ours[0]) if not extra else ("mixed with" in ours[0])
    assert sorted(p.name for p in out.iterdir()) == before and (out / "run.json").read_text() == index
    # the same model adds to its run only with --append, and only on the same prompts
    assert _scan(checkpoint_dir / "llama-gqa", out, "--prompts", str(prompts), "--append", probes="induction") == 0
    run = Run.open(out)
    assert {"first_token_sink", "induction"} <= set(run.results)
    assert {p["name"] for p in run.info["probes"]} >= {"first_token_sink", "induction"}
    other = _prompts_file(tmp_path / "..", ["Another prompt entirely, about the sea."])
    capsys.readouterr()
    assert _scan(checkpoint_dir / "llama-gqa", out, "--prompts", str(other), "--append", probes="induction") == 2
    assert "other inputs" in capsys.readouterr().err


# ---- 9. probes that score nothing, interventions that edit nothing ------------------------------------------------


def test_scan_and_show_say_not_scored_with_the_reason(checkpoint_dir, tmp_path, capsys):
    """RazorAttention's echo/induction need a repeated block; retrieval needs a causal model: on a bidirectional
    encoder with NIAH prompts neither scores, and both commands say why instead of printing blank rows."""
    out = tmp_path / "run"
    code = main(
        [
            "scan",
            "--model",
            str(checkpoint_dir / "bert"),
            "--probes",
            "razor_echo_induction,retrieval,first_token_sink",
            "--dataset",
            "niah",
            "--n-prompts",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for name, why in (
        ("razor_echo", "needs prompts made of a repeated block"),
        ("razor_induction", "needs prompts made of a repeated block"),
        ("retrieval_heads", "bidirectional encoder"),
    ):
        line = next(line for line in printed.splitlines() if line.strip().startswith(name + " "))
        assert f"not scored: {why}" in line, line
    assert "first_token_sink" in printed and "not scored" not in next(
        line for line in printed.splitlines() if line.strip().startswith("first_token_sink ")
    )
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.count("not scored:") == 3 and "bidirectional encoder" in shown
    assert main(["show", str(out), "--result", "razor_echo"]) == 0
    assert "not scored: needs prompts made of a repeated block" in capsys.readouterr().out


def test_an_intervention_that_edits_no_heads_says_so(checkpoint_dir, tmp_path, capsys):
    """ACT with head filtering keeps the heads whose lone calibration beats the baseline; with beta = 1 the
    calibration is the identity, so none does: the command, the report and its table say the intervened model is
    the baseline (the +0.000 is not a finding)."""
    out = tmp_path / "act"
    code = main(
        [
            "intervene",
            "--model",
            str(checkpoint_dir / "llama-gqa"),
            "--method",
            "act",
            "--param",
            "beta=1",
            "--param",
            "heads=[[1,0],[1,1]]",
            "--fit",
            "classify:sentiment:valid",
            "--eval",
            "classify:sentiment:test",
            "--n",
            "4",
            "--n-boot",
            "50",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["edited_heads"] == [] and report["fitted"]["n_heads"] == 0
    assert "edits no heads" in report["note"] and "head filtering kept none of its 2 candidate heads" in report["note"]
    assert "note: act edits no heads" in captured.out and "note: act edits no heads" in captured.err


def test_an_intervention_that_edits_heads_has_no_note(loaded):
    from attnlab.interventions.zerotuning import ZeroTuning

    model = loaded("llama-gqa")
    zt = ZeroTuning(gamma=2.0, heads=[(1, 0)]).fit(model)
    assert zt.edited_heads() == ((1, 0),) and zt.does_nothing() is None
    none = ZeroTuning(gamma=2.0, heads=[]).fit(model)
    assert none.edited_heads() == () and "edits no heads" in none.does_nothing()


# ---- 8. ablate on the user's own prompts ---------------------------------------------------------------------------


LONG = ("One two three four five six seven eight nine ten. " * 30).strip()  # > the tiny GPT-2's 256 positions


def test_ablate_on_my_own_prompts_with_answers_and_truncation(checkpoint_dir, tmp_path, capsys, loaded):
    run = tmp_path / "run"
    assert _scan(checkpoint_dir / "gpt2", run, "--prompts", str(_prompts_file(tmp_path))) == 0
    items = tmp_path / "task.jsonl"
    items.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "The cat sat on the", "answer": "mat"},
                {"prompt": "Paris is the capital of", "answer": "France"},
                {"prompt": LONG, "answer": "eleven"},
            ]
        )
    )
    args = ["ablate", "--model", str(checkpoint_dir / "gpt2"), "--heads", f"{run}:first_token_sink"]
    args += ["--k", "2", "--n-seeds", "2", "--prompts", str(items), "--out", str(tmp_path / "causal"), "--quiet"]
    capsys.readouterr()
    assert main(args) == 2  # the long prompt does not fit the tiny model's context, and the message says what to do
    err = capsys.readouterr().err
    assert "pass --truncate" in err and len([x for x in err.splitlines() if x.startswith("attnlab:")]) == 1
    assert main([*args, "--truncate"]) == 0
    table = json.loads((tmp_path / "causal" / "causal_test_first_token_sink_k2_logprob.json").read_text())
    assert table["prompts"] == 3 and table["metric"] == "logprob"
    # the baseline is the mean summed log-prob of the answers: checked against a plain forward pass
    import torch

    model = loaded("gpt2")
    want = []
    for prompt, answer in [("The cat sat on the", " mat"), ("Paris is the capital of", " France")]:
        ids = model.token_ids(prompt)
        ans = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model.forward(model.batch_from_ids([ids + ans], [0]))[0].float().log_softmax(-1)
        want.append(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(ans)))
    base = next(r for r in table["rows"] if r["condition"] == "baseline")["metric"]
    long_ids = model.token_ids(LONG, truncate=True)
    ans = model.tokenizer(" eleven", add_special_tokens=False)["input_ids"]
    long_ids = long_ids[: model.n_ctx - len(ans)]
    with torch.no_grad():
        logp = model.forward(model.batch_from_ids([long_ids + ans], [0]))[0].float().log_softmax(-1)
    want.append(sum(float(logp[len(long_ids) - 1 + j, t]) for j, t in enumerate(ans)))
    assert base == pytest.approx(float(np.mean(want)), abs=1e-4)


def test_ablate_help_offers_only_flags_it_accepts():
    from attnlab.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["ablate"]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {"--prompts", "--truncate", "--quiet"} <= flags


# ---- 10. progress on long work -------------------------------------------------------------------------------------


def _bar_lines(err: str) -> list[str]:
    """tqdm's lines: a percentage, a bar, the count and the elapsed<remaining bracket, e.g. ``[00:01<00:02, 3it/s]``
    (``<?`` before the first step: a quick command may finish before tqdm redraws)."""
    import re

    bar = r"\d+%\|.*\| *\d+/\d+ \[\d+:\d+<(\?|\d+:\d+)"
    return [x for x in re.split(r"[\r\n]", err) if re.search(bar, x)]


@pytest.mark.parametrize("quiet", [False, True])
def test_ablate_and_intervene_show_progress_with_an_eta(checkpoint_dir, tmp_path, capsys, quiet):
    run = tmp_path / "run"
    assert _scan(checkpoint_dir / "llama-gqa", run, "--prompts", str(_prompts_file(tmp_path))) == 0
    capsys.readouterr()
    q = ["--quiet"] if quiet else []
    assert (
        main(
            ["ablate", "--model", str(checkpoint_dir / "llama-gqa"), "--heads", f"{run}:first_token_sink"]
            + ["--k", "1", "--n-seeds", "2", "--prompts", str(_prompts_file(tmp_path)), "--out", str(tmp_path / "c")]
            + q
        )
        == 0
    )
    ablate_err = capsys.readouterr().err
    assert (
        main(
            ["intervene", "--model", str(checkpoint_dir / "llama-gqa"), "--method", "zerotuning"]
            + ["--param", "gamma=2", "--eval", "classify:sentiment:test", "--n", "4", "--n-boot", "20"]
            + ["--out", str(tmp_path / "iv")]
            + q
        )
        == 0
    )
    iv_err = capsys.readouterr().err
    if quiet:
        assert _bar_lines(ablate_err) == [] and _bar_lines(iv_err) == []
    else:
        assert any("ablate top-1 vs 2 random sets" in x for x in _bar_lines(ablate_err)), ablate_err
        assert any("baseline on" in x for x in _bar_lines(iv_err)) and any(
            "intervened on" in x for x in _bar_lines(iv_err)
        )


@pytest.mark.skipif(bundled_path("organism-lm") is None, reason="organism-lm not bundled")
def test_eval_shows_progress_and_its_help_says_what_n_counts(capsys):
    from attnlab.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["eval"]
    help_text = " ".join(sub.format_help().split())
    assert "trials per (length, depth) cell" in help_text and "evaluation items" not in help_text
    assert main(["eval", "organism-lm", "--task", "recall", "--n", "40"]) == 0
    captured = capsys.readouterr()
    assert any("generate (40 prompts)" in x for x in _bar_lines(captured.err)), captured.err
    assert json.loads(captured.out)["recall_n"] == 40


# ---- 11, 12: each probe once; streaming heads ranked as the statistic means ----------------------------------------


def test_scan_runs_each_probe_once(loaded, monkeypatch):
    """``induction`` is a probe and a group: the CLI passes the expanded list (previous_token, duplicate_token,
    induction), and the group inside it must not add its members a second time."""
    from attnlab.probes.registry import expand

    model = loaded("gpt2")
    attached = []
    from attnlab.probes.pattern_match import PatternMatchProbe

    real = PatternMatchProbe.attach
    monkeypatch.setattr(PatternMatchProbe, "attach", lambda self, *a: (attached.append(self.name), real(self, *a))[1])
    result = attnlab.scan(model, expand("induction"), SHORT_SENTENCES[:2], progress=False)
    assert sorted(attached) == ["duplicate_token", "induction", "previous_token"]
    assert [p["name"] for p in result.info["probes"]] == ["previous_token", "duplicate_token", "induction"]
    with pytest.raises(AttnlabError, match="two probes named"):
        from attnlab.probes.induction import InductionHeads

        attnlab.scan(model, [InductionHeads(), InductionHeads()], SHORT_SENTENCES[:1], progress=False)


def test_streaming_heads_top_are_the_most_streaming(loaded, capsys, tmp_path, checkpoint_dir):
    """Low distant mass = a streaming head: ``top`` (and the CLI's top list) ranks the lowest first."""
    from attnlab.datasets import DATASETS

    model = loaded("llama-gqa")
    r = attnlab.scan(model, "streaming_heads", DATASETS["niah"](model, 2, 0), progress=False)["streaming_heads"]
    top = r.top(3)
    finite = np.sort(r.scores[np.isfinite(r.scores)])
    assert r.higher_is == "less" and list(top["score"]) == list(finite[:3])
    assert top["rank"].iloc[0] == 1
