"""The CLI's help lists come from the registries: every probe, group, dataset, eval task, intervention method, data
spec form and ablation metric appears in the help of the command that takes it; organism shapes come from configs."""

from __future__ import annotations

import json
import re

import pytest

from attnlab.cli import main


def help_of(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping: names stay whole
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_scan_help_lists_every_probe_group_and_dataset(capsys, monkeypatch):
    from attnlab.datasets import DATASETS
    from attnlab.probes.registry import GROUPS, PROBES

    text = help_of("scan", capsys, monkeypatch)
    for name in [*PROBES, *GROUPS, *DATASETS]:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name
    for group, members in GROUPS.items():
        assert f"{group} = {', '.join(members)}" in text


def test_eval_help_lists_every_organisms_tasks(capsys, monkeypatch):
    import importlib

    from attnlab.models.bundled import BUNDLED

    text = help_of("eval", capsys, monkeypatch)
    organisms = [m for m in BUNDLED.values() if m.eval_module]
    assert organisms
    for m in organisms:
        tasks = importlib.import_module(m.eval_module).EVAL_TASKS
        assert f"{m.alias} ({', '.join(tasks)})" in text


def test_intervene_help_lists_every_method_and_data_spec(capsys, monkeypatch):
    from attnlab.datasets import icl
    from attnlab.datasets.specs import data_spec_forms
    from attnlab.interventions.registry import INTERVENTIONS

    text = help_of("intervene", capsys, monkeypatch)
    for name in INTERVENTIONS:
        assert f"{name}: " in text, name
    for form in data_spec_forms():
        assert form in text, form
    assert all(t in text for t in icl.TASK_NAMES)


def test_ablate_help_lists_every_metric(capsys, monkeypatch):
    from attnlab.ablation.evaluators import METRICS

    text = help_of("ablate", capsys, monkeypatch)
    for name in METRICS:
        assert name in text


def test_models_reads_each_organisms_shape_from_its_config(capsys, monkeypatch):
    from attnlab.models.bundled import BUNDLED

    monkeypatch.setenv("COLUMNS", "100000")
    assert main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    checked = 0
    for alias, m in BUNDLED.items():
        path = m.path
        if path is None or not (path / "config.json").is_file():
            continue
        cfg = json.loads((path / "config.json").read_text())
        cfg = cfg.get("text_config") or cfg
        assert f"{cfg['num_hidden_layers']} layers x {cfg['num_attention_heads']} heads" in lines[alias], alias
        checked += 1
    assert checked >= 2


def test_a_bad_metric_is_refused_before_loading(capsys):
    assert main(["ablate", "--model", "nope", "--heads", "r:x", "--metric", "bogus", "--out", "/tmp/x"]) == 2
    assert "--metric must be one of" in capsys.readouterr().err
