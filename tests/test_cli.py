"""The CLI end to end on a tiny checkpoint: scan writes a run and figures; show and models print them."""

from __future__ import annotations

import json
import subprocess
import sys

from attnlab.cli import main


def test_scan_writes_a_run_with_figures(checkpoint_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"prompt": p})
            for p in ["The cat sat on the mat. The cat sat on the mat.", "Paris is in France."]
        )
    )
    out = tmp_path / "run"
    code = main(
        [
            "scan",
            "--model",
            str(checkpoint_dir / "llama-gqa"),
            "--probes",
            "sinks,induction",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "first_token_sink" in printed and "results:" in printed and "figures:" in printed
    index = json.loads((out / "run.json").read_text())
    assert {"first_token_sink", "act_hidden_sinks", "induction", "previous_token"} <= set(index["results"])
    assert index["info"]["dataset"]["n_prompts"] == 2
    assert (out / "figures" / "first_token_sink.html").stat().st_size > 1000
    assert main(["show", str(out)]) == 0
    assert "induction" in capsys.readouterr().out


def test_dataset_scan_and_models_listing(capsys, tmp_path):
    assert main(["models"]) == 0
    assert "minilm" in capsys.readouterr().out
    assert (
        main(
            [
                "scan",
                "--model",
                "minilm",
                "--probes",
                "induction",
                "--dataset",
                "repeated-random",
                "--n-prompts",
                "2",
                "--out",
                str(tmp_path / "r"),
                "--quiet",
            ]
        )
        == 0
    )


def test_show_on_a_non_run_is_a_user_error(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    assert "not an attnlab run directory" in capsys.readouterr().err


def test_console_script_help_exits_zero():
    for args in (["--help"], ["scan", "--help"], ["show", "--help"], ["models", "--help"], ["eval", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "attnlab", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, args
        assert "usage" in proc.stdout


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnlab",
            "scan",
            "--model",
            str(tmp_path),
            "--dataset",
            "prose",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
