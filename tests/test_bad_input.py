"""Bad input gets a user error: exit 2 and one plain line, never "internal error" (exit 1) and never a traceback
(issue #18). One test per case of the issue's sweep; each names the message it expects."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SHORT_SENTENCES

import attnlab
from attnlab.cli import main
from attnlab.errors import AttnlabError

NOISE = ("Loading weights", "Writing model shards")  # transformers' own progress bars on stderr


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the stderr lines of ``attnlab ARGS`` run in-process (argparse exits are caught)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip() and not line.lstrip("\r").startswith(NOISE)]


def assert_user_error(args, capsys, expect: str) -> str:
    code, lines = run_cli(args, capsys)
    assert code == 2, (args, lines)
    assert len(lines) == 1, lines
    assert "internal error" not in lines[0] and expect in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, loaded):
    """A small scan of the tiny Llama: head and token results."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    attnlab.scan(loaded("llama-gqa"), "first_token_sink,act_sinks", SHORT_SENTENCES[:2], out=out, progress=False)
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny run to damage."""
    d = tmp_path / "copy"
    shutil.copytree(tiny_run, d)
    return d


# ---- prompts files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,content,expect",
    [
        ("bin.txt", bytes(range(256)), "NUL bytes"),
        ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "is not UTF-8 text"),
        ("nul.txt", b"hello\x00world\n", "NUL bytes"),
        ("list.jsonl", b'{"prompt": "ok"}\n[1, 2]\n', "line 2 is a JSON list"),
        ("num.jsonl", b"3\n", "line 1 is a JSON int"),
        ("noprompt.jsonl", b'{"text": 5}\n', 'line 1 has no non-empty string "prompt"'),
        ("bad.jsonl", b'{"prompt": \n', "line 1 is not valid JSON"),
        ("deep.json", b"[" * 100000, "nests JSON too deeply"),
        ("empty.txt", b"\n  \n", "holds no prompts"),
    ],
)
def test_bad_prompts_files_are_user_errors(tmp_path, capsys, name, content, expect):
    f = tmp_path / name
    f.write_bytes(content)
    assert_user_error(["scan", "--model", "nowhere", "--prompts", f, "--out", tmp_path / "o"], capsys, expect)


# ---- numbers and directories: refused by the argument types, before anything is loaded -------------------------------


@pytest.mark.parametrize(
    "args,expect",
    [
        (["scan", "--dataset", "prose", "--n-prompts", "-1"], "--n-prompts: must be a positive integer, got -1"),
        (["scan", "--dataset", "prose", "--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["scan", "--dataset", "prose", "--batch-size", "-1"], "--batch-size: must be a positive integer, got -1"),
        (["scan", "--dataset", "prose", "--top", "-1"], "--top: must be a positive integer, got -1"),
        (["scan", "--dataset", "prose", "--seed", "-3"], "--seed: must be a non-negative integer, got -3"),
        (["scan", "--dataset", "prose", "--n-prompts", "1e9"], "--n-prompts: must be a positive integer, got '1e9'"),
        (["scan", "--dataset", "prose", "--n-prompts", "9" * 40], "of at most"),
    ],
)
def test_scan_numbers_are_checked_at_the_edge(tmp_path, capsys, args, expect):
    assert_user_error([*args, "--model", "nowhere", "--out", tmp_path / "o"], capsys, expect)


def test_out_directory_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """A file, a path under a file, a pseudo file system: refused by the argument type, so no model is loaded."""
    monkeypatch.setattr(attnlab, "load", lambda *a, **k: pytest.fail("a model was loaded before --out was checked"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, expect in [
        (a_file, "is a file, not a directory"),
        (a_file / "sub", "which is a file, not a directory"),
        ("/proc/attnlab-test", "pseudo file system"),
        ("/sys/attnlab", "pseudo file system"),
        ("", "must be a directory path"),
    ]:
        for cmd in (
            ["scan", "--model", "minilm", "--dataset", "prose"],
            ["intervene", "--model", "minilm", "--method", "zerotuning", "--eval", "classify:sentiment:test"],
            ["ablate", "--model", "minilm", "--heads", "r:x"],
            ["census", "--model", "minilm", "--dataset", "prose"],
        ):
            assert_user_error([*cmd, "--out", out], capsys, expect)


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root may write into a read-only directory")
def test_unwritable_out_directory_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert_user_error(["scan", "--model", "x", "--dataset", "prose", "--out", ro / "o"], capsys, "cannot write into")


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--k", "0"], "--k: must be a positive integer, got 0"),
        (["--k", "-2"], "--k: must be a positive integer, got -2"),
        (["--n-seeds", "-1"], "--n-seeds: must be a positive integer, got -1"),
        (["--n-seeds", "0"], "--n-seeds: must be a positive integer, got 0"),
    ],
)
def test_ablate_numbers(tmp_path, capsys, args, expect):
    assert_user_error(["ablate", "--model", "x", "--heads", "r:n", "--out", tmp_path, *args], capsys, expect)


def test_ablate_k_larger_than_the_grid_is_refused_before_loading(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(attnlab, "load", lambda *a, **k: pytest.fail("loaded a model for an impossible --k"))
    heads = f"{tiny_run}:first_token_sink"
    assert_user_error(
        ["ablate", "--model", "x", "--heads", heads, "--k", "100000", "--out", tmp_path], capsys, "--k 100000 is more"
    )
    assert_user_error(["ablate", "--model", "x", "--heads", heads, "--k", "5", "--out", tmp_path], capsys, "leaves 3")


@pytest.mark.parametrize("n", ["-1", "0", "x"])
def test_eval_n_must_be_positive(capsys, n):
    assert_user_error(["eval", "organism-lm", "--task", "niah", "--n", n], capsys, "--n: must be a positive integer")


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--n-boot", "0"], "--n-boot: must be a positive integer, got 0"),
        (["--n", "0"], "--n: must be a positive integer, got 0"),
        (["--n-fit", "-4"], "--n-fit: must be a positive integer, got -4"),
        (["--param", "gamma=nan"], "--param gamma: nan is not a finite number"),
        (["--param", "gamma=NaN"], "--param gamma: NaN is not a finite number"),
        (["--param", "gamma=-Infinity"], "--param gamma: -Infinity is not a finite number"),
        (["--param", "heads=[[0, NaN]]"], "--param heads: NaN is not a finite number"),
        (["--param", "gamma=inf"], "--param gamma: inf is not a finite number"),
    ],
)
def test_intervene_values(tmp_path, capsys, monkeypatch, args, expect):
    monkeypatch.setattr(attnlab, "load", lambda *a, **k: pytest.fail("loaded a model with a bad value"))
    base = ["intervene", "--model", "x", "--method", "zerotuning", "--eval", "classify:sentiment:test"]
    assert_user_error([*base, "--out", tmp_path / "o", *args], capsys, expect)


@pytest.mark.parametrize("port", ["70000", "-1", "0", "http"])
def test_app_port_range(tmp_path, capsys, port):
    assert_user_error(["app", "--runs", tmp_path, "--port", port], capsys, "--port: must be a port number (1-65535)")


def test_argument_errors_are_one_line_without_usage(capsys):
    code, lines = run_cli(["scan", "--probes", "sinks"], capsys)
    assert code == 2 and len(lines) == 1 and "the following arguments are required" in lines[0]
    assert not lines[0].startswith("usage")


# ---- run directories read by show and ablate --heads -----------------------------------------------------------


def test_show_missing_result_name(tiny_run, capsys):
    line = assert_user_error(["show", tiny_run, "--result", "nope"], capsys, "no result 'nope'")
    assert "KeyError" not in line and "first_token_sink" in line


@pytest.mark.parametrize(
    "damage,expect",
    [
        (lambda d: (d / "run.json").write_bytes(b"{not json"), "run.json is malformed: not readable JSON"),
        (lambda d: (d / "run.json").write_bytes(b"\xff\xfe\x00"), "run.json is malformed: not readable JSON"),
        (lambda d: (d / "run.json").write_text("[1, 2]"), "a JSON list, not an object"),
        (lambda d: (d / "run.json").write_text('{"info": "x"}'), '"info" is not an object'),
        (lambda d: (d / "run.json").write_text('{"info": {"model": [1]}}'), '"info.model" is not an object'),
        (
            lambda d: (d / "run.json").write_text('{"info": {"dataset": {"n_prompts": "many"}}}'),
            '"info.dataset.n_prompts" is not a non-negative integer',
        ),
        (lambda d: (d / "run.json").write_text('{"results": {"x": 3}}'), "result 'x' has no kind"),
        (
            lambda d: (d / "run.json").write_text('{"results": {"../../outside/SECRET": {"kind": "head_scores"}}}'),
            "is not a plain name",
        ),
        (lambda d: (d / "run.json").write_text('{"status": "done?"}'), '"status" is'),
        (lambda d: (d / "first_token_sink.json").write_text("{trunc"), "result first_token_sink in copy is unreadable"),
        (
            lambda d: (d / "first_token_sink.safetensors").write_bytes(
                (d / "first_token_sink.safetensors").read_bytes()[:40]
            ),
            "result first_token_sink in copy is unreadable",
        ),
        (
            lambda d: (d / "first_token_sink.json").write_text(
                json.dumps({**json.loads((d / "first_token_sink.json").read_text()), "shape": [1], "extra": 7})
            ),
            "result first_token_sink in copy is unreadable",
        ),
    ],
)
def test_damaged_runs_are_user_errors_in_show_and_ablate(run_copy, tmp_path, capsys, monkeypatch, damage, expect):
    monkeypatch.setattr(attnlab, "load", lambda *a, **k: pytest.fail("loaded a model for a damaged run"))
    damage(run_copy)
    assert_user_error(["show", run_copy], capsys, expect)
    heads = f"{run_copy}:first_token_sink"
    assert_user_error(["ablate", "--model", "x", "--heads", heads, "--k", "1", "--out", tmp_path / "t"], capsys, expect)


def test_links_and_names_leaving_the_run_are_refused(run_copy, tmp_path, capsys):
    """A result file or run.json that is a symlink out of the run, and a result name that is a path: refused before
    the file outside is opened."""
    outside = tmp_path / "outside"
    shutil.copytree(run_copy, outside)
    for suffix in (".json", ".safetensors"):
        (run_copy / f"first_token_sink{suffix}").unlink()
        (run_copy / f"first_token_sink{suffix}").symlink_to(outside / f"first_token_sink{suffix}")
    assert_user_error(["show", run_copy], capsys, "points outside the run directory")
    assert_user_error(["show", run_copy, "--result", "first_token_sink"], capsys, "points outside the run directory")
    (run_copy / "run.json").unlink()
    (run_copy / "run.json").symlink_to(outside / "run.json")
    assert_user_error(["show", run_copy], capsys, "run.json in copy points outside the run directory")


# ---- models and probes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_checkpoints(tmp_path_factory, checkpoint_dir):
    """A tiny Mamba (no attention) and a tiny T5 (encoder-decoder), with the tiny GPT-2's tokenizer."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("odd")
    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, state_size=4)).save_pretrained(
        root / "mamba"
    )
    T5ForConditionalGeneration(
        T5Config(vocab_size=400, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    ).save_pretrained(root / "t5")
    for name in ("mamba", "t5"):
        for f in (checkpoint_dir / "gpt2").iterdir():
            if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
                shutil.copy(f, root / name / f.name)
    return root


@pytest.mark.parametrize(
    "name,expect",
    [
        ("mamba", "unsupported architecture MambaForCausalLM: no attention layers"),
        ("t5", "unsupported architecture T5ForConditionalGeneration: an encoder-decoder model"),
    ],
)
def test_architectures_without_decoder_attention_are_unsupported(odd_checkpoints, tmp_path, capsys, name, expect):
    args = ["scan", "--model", odd_checkpoints / name, "--dataset", "prose", "--n-prompts", "1", "--out", tmp_path]
    assert_user_error(args, capsys, expect)
    with pytest.raises(AttnlabError, match="unsupported architecture"):
        attnlab.load(str(odd_checkpoints / name))


def test_vision_probes_on_a_text_model_are_not_scored(checkpoint_dir, tmp_path, capsys):
    args = ["scan", "--model", checkpoint_dir / "llama-gqa", "--probes", "vision", "--dataset", "prose"]
    line = assert_user_error([*args, "--n-prompts", "1", "--out", tmp_path / "o"], capsys, "not scored: text model")
    assert line.startswith("attnlab: error: vision_aware_heads")
    assert not (tmp_path / "o" / "run.json").exists()  # refused before a run was started


def test_preplan_anchor_needs_responses(checkpoint_dir, tmp_path, capsys):
    args = ["scan", "--model", checkpoint_dir / "llama-gqa", "--probes", "preplan_anchor", "--dataset", "prose"]
    assert_user_error([*args, "--n-prompts", "2", "--out", tmp_path], capsys, "prompt 0 has no response to score")


def test_vlm_prompt_with_image_token_and_no_image(checkpoint_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("USER: <image>\nWhat is this? ASSISTANT:\n")
    args = ["scan", "--model", checkpoint_dir / "llava", "--probes", "first_token_sink", "--prompts", prompts]
    assert_user_error([*args, "--out", tmp_path / "o"], capsys, "missing image: prompt 0 holds the image token")


# ---- sizes that cannot fit -----------------------------------------------------------------------------------------


def test_huge_n_prompts_is_refused_with_an_estimate(checkpoint_dir, tmp_path, capsys):
    args = ["scan", "--model", checkpoint_dir / "llama-gqa", "--dataset", "repeated-random"]
    line = assert_user_error([*args, "--n-prompts", "20000000", "--out", tmp_path], capsys, "--n-prompts 20,000,000")
    assert "of memory, more than the" in line and "use a smaller --n-prompts" in line


@pytest.mark.parametrize("organism,task", [("organism-vlm", "sink"), ("organism-dit", "classify")])
def test_eval_sizes_that_cannot_fit_are_refused_before_loading(capsys, monkeypatch, organism, task):
    from attnlab.models.bundled import bundled_path

    if bundled_path(organism) is None:
        pytest.skip(f"{organism} is not bundled in this checkout")
    import importlib

    from attnlab.cli import _organisms

    module = importlib.import_module(_organisms()[organism].eval_module)
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: pytest.fail("evaluated a size that cannot fit"))
    line = assert_user_error(["eval", organism, "--task", task, "--n", "100000000"], capsys, "of memory")
    assert "use a smaller --n" in line
