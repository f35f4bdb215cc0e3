"""Property-based (hypothesis): random bytes and values fed to the prompt readers, the result readers and every
command's arguments end in success or a user error (exit 2, one line), never an internal error (exit 1) or a
traceback. Bounded: a few dozen examples per property, no deadline, and every command reaches a fast failure path
(a model that does not exist, a runs directory that does not exist) instead of loading a model."""

from __future__ import annotations

import json
import shutil
import string

import pytest
from conftest import SHORT_SENTENCES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.cli import (
    main,
    read_prompts,  # re-exported from attnlab.cli_args
)
from attnlab.errors import AttnlabError
from attnlab.heads.runs import Run

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)
NO_MODEL = "/nonexistent/attnlab-model"

numbers = st.one_of(
    st.integers(-(10**15), 10**15).map(str),
    st.sampled_from(["0", "-1", "1", "nan", "inf", "-inf", "1e3", "0x10", " 7 ", "", "٣", "1_000", "9" * 50]),
    st.text(string.printable, max_size=12),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def outcome(args, capsys) -> tuple[int, list[str]]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert code in (0, 2), (args, code, lines)
    assert "internal error" not in captured.err, (args, lines)
    if code == 2:
        assert len(lines) == 1, (args, lines)
    return code, lines


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, loaded):
    out = tmp_path_factory.mktemp("prop") / "tiny"
    attnlab.scan(loaded("llama-gqa"), "first_token_sink,act_sinks", SHORT_SENTENCES[:2], out=out, progress=False)
    return out


# ---- readers -------------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.lists(json_values, max_size=5).map(lambda xs: "\n".join(json.dumps(x) for x in xs).encode()),
        json_values.map(lambda x: json.dumps(x).encode()),
    ),
    suffix=st.sampled_from([".txt", ".jsonl", ".json", ""]),
)
def test_prompt_reader_gives_prompts_or_a_user_error(tmp_path_factory, content, suffix):
    f = tmp_path_factory.mktemp("p") / f"prompts{suffix}"
    f.write_bytes(content)
    try:
        prompts = read_prompts(str(f))
    except AttnlabError as e:
        assert "\n" not in str(e).strip()
        return
    assert prompts and all(isinstance(p, str) and p.strip() and "\x00" not in p for p in prompts)


@SETTINGS
@given(
    which=st.sampled_from(
        ["run.json", "first_token_sink.json", "first_token_sink.safetensors", "act_sink_tokens_0.json"]
    ),
    content=st.one_of(st.binary(max_size=400), json_values.map(lambda x: json.dumps(x).encode())),
    cut=st.none() | st.integers(0, 2000),
)
def test_result_readers_give_results_or_a_user_error(tiny_run, tmp_path_factory, which, content, cut):
    """A run whose index, result JSON or safetensors holds random bytes or JSON (or is truncated): opening it and
    loading every result it lists is a result or an AttnlabError, and ``show`` exits 0 or 2."""
    d = tmp_path_factory.mktemp("r") / "run"
    shutil.copytree(tiny_run, d)
    original = (d / which).read_bytes()
    (d / which).write_bytes(original[:cut] if cut is not None else content)
    try:
        run = Run.open(d)
        for name in run.results:
            run[name]
    except AttnlabError as e:
        assert "\n" not in str(e).strip()


@SETTINGS
@given(damage=st.sampled_from(["run.json", "first_token_sink.json", "first_token_sink.safetensors"]), data=st.data())
def test_show_on_damaged_runs_exits_0_or_2(tiny_run, tmp_path_factory, capsys, damage, data):
    d = tmp_path_factory.mktemp("s") / "run"
    shutil.copytree(tiny_run, d)
    (d / damage).write_bytes(data.draw(st.binary(max_size=200) | json_values.map(lambda x: json.dumps(x).encode())))
    assert outcome(
        ["show", d, *data.draw(st.sampled_from([[], ["--result", "first_token_sink"], ["--top", "2"]]))], capsys
    )[0] in (0, 2)


# ---- every command's arguments ---------------------------------------------------------------------------------------


@SETTINGS
@given(n=numbers, batch=numbers, top=numbers, seed=numbers, probes=st.text(max_size=20), out=st.text(max_size=20))
def test_scan_arguments(tmp_path_factory, capsys, n, batch, top, seed, probes, out):
    base = tmp_path_factory.mktemp("o")
    args = ["scan", "--model", NO_MODEL, "--dataset", "prose", "--n-prompts", n, "--batch-size", batch]
    assert outcome(
        [*args, "--top", top, "--seed", seed, "--probes", probes or ",", "--out", base / (out or "x")], capsys
    )[0] in (0, 2)


@SETTINGS
@given(
    k=numbers, seeds=numbers, seed=numbers, heads=st.text(max_size=30), metric=st.text(max_size=10), real=st.booleans()
)
def test_ablate_arguments(tiny_run, tmp_path_factory, capsys, k, seeds, seed, heads, metric, real):
    spec = f"{tiny_run}:{heads or 'first_token_sink'}" if real else heads or ":"
    args = ["ablate", "--model", NO_MODEL, "--heads", spec, "--k", k, "--n-seeds", seeds, "--seed", seed]
    assert outcome([*args, "--metric", metric or "niah", "--out", tmp_path_factory.mktemp("a")], capsys)[0] == 2


@SETTINGS
@given(
    params=st.lists(st.text(max_size=25), max_size=3),
    n=numbers,
    n_boot=numbers,
    spec=st.sampled_from(["classify:sentiment:test", "icl:choose_last:test", "pope:random:3", "x:y", ""]),
    method=st.sampled_from(["zerotuning", "act", "softpag", "nope"]),
)
def test_intervene_arguments(tmp_path_factory, capsys, params, n, n_boot, spec, method):
    args = ["intervene", "--model", NO_MODEL, "--method", method, "--eval", spec, "--n", n, "--n-boot", n_boot]
    args += [x for p in params for x in ("--param", p)]
    assert outcome([*args, "--out", tmp_path_factory.mktemp("i") / "o"], capsys)[0] == 2


@SETTINGS
@given(n=numbers, seed=numbers, task=st.text(max_size=10), model=st.sampled_from(["organism-lm", "nope", "/tmp"]))
def test_eval_arguments(capsys, n, seed, task, model):
    assert outcome(["eval", model, "--task", task or "niah", "--n", n, "--seed", seed, "--device", "cuda:7"], capsys)[
        0
    ] in (0, 2)  # no traceback, one line on exit 2


@SETTINGS
@given(port=numbers, host=st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "example.org"]))
def test_app_arguments(tmp_path_factory, capsys, port, host):
    missing = tmp_path_factory.mktemp("app") / "missing"
    assert outcome(["app", "--runs", missing, "--port", port, "--host", host], capsys)[0] == 2


@SETTINGS
@given(top=numbers, result=st.text(max_size=30))
def test_show_arguments(tiny_run, capsys, top, result):
    assert outcome(["show", tiny_run, "--top", top, *(["--result", result] if result else [])], capsys)[0] in (
        0,
        2,
    )  # no traceback, one line on exit 2


@SETTINGS
@given(
    fmt=st.sampled_from(["retrieval-head", "duo", "headvis"]),
    content=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda x: json.dumps(x).encode()),
        st.dictionaries(st.text(max_size=8), st.lists(st.floats(), max_size=4), max_size=4).map(
            lambda d: json.dumps(d).encode()
        ),
        st.lists(st.text(string.printable, max_size=30), max_size=5).map(lambda ls: "\n".join(ls).encode()),
    ),
    n=numbers,
)
def test_import_reads_files_or_gives_a_user_error(tmp_path_factory, capsys, fmt, content, n):
    """``attnlab import`` on random bytes, JSON or TSV-like text: a run or one line with exit 2."""
    d = tmp_path_factory.mktemp("imp")
    f = d / ("file.tsv" if fmt == "duo" else "file.json")
    f.write_bytes(content)
    extra = ["--n-heads", n, "--config", d / "config.json"] if fmt == "duo" else ["--n-kv-heads", n]
    if fmt == "duo":
        (d / "config.json").write_bytes(content[:80])
    assert outcome(["import", fmt, f, "--out", d / "run", *(extra if fmt != "headvis" else [])], capsys)[0] in (
        0,
        2,
    )  # no traceback, one line on exit 2
