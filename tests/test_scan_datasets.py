"""`attnlab scan` on the vision and reasoning datasets: shape scenes with the vision probes on a VLM (run, overlay
figure, images the app can regenerate), arithmetic with the preplan/anchor probe, and one-line errors (exit 2) for
a bad dataset name or image prompts on a text model."""

from __future__ import annotations

import json
import subprocess
import sys

from attnlab.cli import main


def test_shapes_dataset_runs_the_vision_group_and_the_app_can_regenerate_its_images(checkpoint_dir, tmp_path, capsys):
    import attnlab
    from attnlab.apps.vision import run_image_prompts, shape_prompts
    from attnlab.datasets import DATASETS
    from attnlab.heads.runs import Run

    out = tmp_path / "vlm"
    path = str(checkpoint_dir / "llava")
    assert (
        main(
            [
                "scan",
                "--model",
                path,
                "--probes",
                "vision",
                "--dataset",
                "shapes",
                "--n-prompts",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    index = json.loads((out / "run.json").read_text())
    assert {"vhd", "vhd_raw", "image_centric", "image_attention"} <= set(index["results"])
    assert (
        index["info"]["dataset"]["name"] == "shapes-attribute(n=2,seed=0)"
        and index["info"]["dataset"]["n_prompts"] == 2
    )
    overlay = (out / "figures" / "image_overlay_vhd.html").read_text()
    assert len(overlay) > 1000 and "heatmap" in overlay
    m = attnlab.load(path)
    texts, images = run_image_prompts(m, Run.open(out).info)  # the app's vision view: same inputs as the scan
    assert texts == DATASETS["shapes"](m, 2, 0).texts == shape_prompts("attribute", 2, 0).texts and len(images) == 2


def test_arithmetic_dataset_runs_preplan_anchor_on_the_response(checkpoint_dir, tmp_path, capsys):
    from attnlab.datasets import DATASETS
    from attnlab.heads.runs import Run

    out = tmp_path / "lm"
    assert (
        main(
            [
                "scan",
                "--model",
                str(checkpoint_dir / "llama-gqa"),
                "--probes",
                "preplan_anchor",
                "--dataset",
                "arithmetic",
                "--n-prompts",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    run = Run.open(out)
    assert run.info["dataset"]["name"] == "arithmetic(n=2,seed=0)"
    tokens = run["preplan_anchor_tokens_0"]
    import attnlab

    ps = DATASETS["arithmetic"](attnlab.load(str(checkpoint_dir / "llama-gqa")), 2, 0)
    assert len(tokens.tokens) == ps.meta[0]["response_len"]  # scored over the worked solution only, not the problem
    assert not (out / "figures" / "image_overlay_vhd.html").exists()


def test_shapes_on_a_text_model_is_a_one_line_error(checkpoint_dir, tmp_path, capsys):
    assert (
        main(
            [
                "scan",
                "--model",
                str(checkpoint_dir / "llama-gqa"),
                "--probes",
                "vision",
                "--dataset",
                "shapes",
                "--out",
                str(tmp_path / "o"),
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()  # the model loads before the dataset is built (progress bar)
    assert "not a vision-language model" in err[-1] and not any("Traceback" in e for e in err)


def test_bad_dataset_name_lists_the_new_ones_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnlab",
            "scan",
            "--model",
            "minilm",
            "--dataset",
            "shapez",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "shapez" in line and "shapes" in line and "arithmetic" in line
