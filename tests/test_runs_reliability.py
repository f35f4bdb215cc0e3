"""Nothing lost, nothing half-written, nothing twice (issue #18): concurrent writers on one run, runs killed with
SIGKILL at a known moment, stale temp files, the run status and ``scan --resume``.

The kill tests run the real CLI in a subprocess (loopback only, nothing served) with ``ATTNLAB_TEST_PAUSE_S``, which
makes a scan sleep between its probes and ``intervene`` after saving its intervention, so the kill lands at a
known point; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHORT_SENTENCES

import attnlab
from attnlab.cli import main
from attnlab.heads.io import clean_stale_temp, write_json
from attnlab.heads.results import HeadScores
from attnlab.heads.runs import Run

ROOT = Path(__file__).resolve().parents[1]


def _scores(name: str) -> HeadScores:
    return HeadScores(scores=np.arange(8.0).reshape(2, 4), name=name, probe="planted")


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


# ---- two writers on one run ---------------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from attnlab.heads.results import HeadScores
    from attnlab.heads.runs import Run

    out, tag, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    run = Run.create(out, probes=[{"name": tag, "params": {}}])
    while not go.exists():  # both writers have opened the run before either adds a result
        time.sleep(0.01)
    for i in range(12):
        run.add(HeadScores(scores=np.full((2, 4), i, float), name=f"{tag}_{i}", probe=tag))
    """
)


def test_two_writers_on_one_run_both_get_indexed(tmp_path):
    """Two processes open one run, then each adds 12 results: all 24 are in run.json (the index is updated under
    an fcntl lock and re-read before each write, so no update is lost)."""
    out, go = tmp_path / "run", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(out), tag, str(go)], env=env, stderr=subprocess.PIPE)
        for tag in ("a", "b")
    ]
    _wait_for(lambda: (out / "run.json").exists(), 60, "the run to be created")
    time.sleep(1.0)  # both have read the index by now (each creates and then waits for go)
    go.touch()
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read().decode()
    index = json.loads((out / "run.json").read_text())
    assert set(index["results"]) == {f"{t}_{i}" for t in "ab" for i in range(12)}
    assert {p["name"] for p in index["info"]["probes"]} == {"a", "b"}
    assert Run.open(out)["b_11"].scores[0, 0] == 11


def test_index_is_rebuilt_from_the_result_files(tmp_path):
    """run.json lost an entry (an older lost update) and lists one whose files are gone: reading the run agrees
    with the files, and the next write stores the agreement."""
    run = Run.create(tmp_path)
    for name in ("kept", "unindexed", "gone"):
        run.add(_scores(name))
    index = json.loads((tmp_path / "run.json").read_text())
    del index["results"]["unindexed"]
    write_json(tmp_path / "run.json", index)
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"gone{suffix}").unlink()
    opened = Run.open(tmp_path)
    assert opened.rebuilt and sorted(opened.results) == ["kept", "unindexed"]
    assert opened["unindexed"].probe == "planted"
    opened.add(_scores("new"))
    assert sorted(json.loads((tmp_path / "run.json").read_text())["results"]) == ["kept", "new", "unindexed"]
    assert not Run.open(tmp_path).rebuilt


def test_stale_temp_files_are_cleaned_on_the_next_write_but_a_live_writers_are_kept(tmp_path):
    run = Run.create(tmp_path)
    dead = tmp_path / f".first_token_sink.json.{_dead_pid()}.k3j2.tmp"
    live = tmp_path / f".other.json.{os.getppid()}.x9q1.tmp"  # a live process (our parent) is writing it
    old_unowned = tmp_path / ".figure.html.tmp"
    fresh_unowned = tmp_path / ".fresh.html.tmp"
    for f in (dead, live, old_unowned, fresh_unowned):
        f.write_text("partial")
    os.utime(old_unowned, (time.time() - 7200, time.time() - 7200))
    run.add(_scores("x"))
    assert not dead.exists() and not old_unowned.exists()
    assert live.exists() and fresh_unowned.exists()
    assert clean_stale_temp(tmp_path) == []


def test_a_run_is_incomplete_until_its_last_probe_is_done(tmp_path, capsys):
    run = Run.create(tmp_path, pending=["p1", "p2"], probes=[{"name": "p1"}, {"name": "p2"}])
    run.add(_scores("p1_score"))
    run.done("p1")
    opened = Run.open(tmp_path)
    assert not opened.complete and opened.pending == ["p2"]
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "incomplete run (probes not finished: p2)" in out and "scan --resume" in out
    run.done("p2")
    assert Run.open(tmp_path).complete and json.loads((tmp_path / "run.json").read_text())["status"] == "complete"


# ---- kill -9 and resume -------------------------------------------------------------------------------------------


def _cli(args: list[str], pause: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATTNLAB_TEST_PAUSE_S": str(pause), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "attnlab", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, checkpoint_dir, loaded):
    """Three CLI processes at once (one start-up cost): a scan A of run "shared" that pauses after each probe, while
    a second scan B of the same run (in this process, other probes) writes between A's two probes; a scan killed
    after its first probe finished; and an intervene killed after it saved its intervention, before its report."""
    root = tmp_path_factory.mktemp("killed")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(SHORT_SENTENCES[:2]) + "\n")
    model = str(checkpoint_dir / "llama-gqa")
    in_process = loaded("llama-gqa")
    scan = ["scan", "--model", model, "--prompts", str(prompts), "--quiet"]
    two = ["--probes", "first_token_sink,previous_token"]
    shared = _cli([*scan, *two, "--out", str(root / "shared")], 5)
    killed = _cli([*scan, *two, "--out", str(root / "killed")], 120)
    iv = _cli(
        [
            *("intervene", "--model", model, "--method", "zerotuning", "--param", "gamma=2"),
            *("--eval", "classify:sentiment:test", "--n", "4", "--n-boot", "10", "--out", str(root / "iv")),
        ],
        120,
    )
    try:
        _wait_for(lambda: _probe_done(root / "shared"), 240, "scan A's first probe")
        attnlab.scan(
            in_process, "duplicate_token", SHORT_SENTENCES[:2], out=root / "shared", progress=False, append=True
        )
        _wait_for(lambda: _probe_done(root / "killed"), 240, "the first probe of the scan to kill")
        killed.send_signal(signal.SIGKILL)
        _wait_for(lambda: (root / "iv" / "intervention" / "intervention.json").exists(), 240, "the intervention")
        iv.send_signal(signal.SIGKILL)
        assert shared.wait(240) == 0, shared.stderr.read().decode()
    finally:
        for p in (shared, killed, iv):
            if p.poll() is None:
                p.kill()
            p.wait(30)
    assert killed.returncode == -signal.SIGKILL and iv.returncode == -signal.SIGKILL
    return root, model, prompts


def _probe_done(run_dir: Path) -> bool:
    """first_token_sink's results are indexed and it has left the pending list."""
    try:
        index = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return "first_token_sink" in index["results"] and "first_token_sink" not in index["pending"]


def test_concurrent_scans_into_one_run_are_both_indexed(killed_runs):
    """Scan B wrote between scan A's probes; A's later writes kept B's results (and B's probe in the run info)."""
    root, *_ = killed_runs
    run = Run.open(root / "shared")
    assert not run.rebuilt and run.complete
    assert {"first_token_sink", "previous_token", "duplicate_token"} <= set(run.results)
    assert {p["name"] for p in run.info["probes"]} == {"first_token_sink", "previous_token", "duplicate_token"}


def test_killed_scan_is_marked_incomplete_and_resume_finishes_it(killed_runs, capsys):
    root, model, prompts = killed_runs
    d = root / "killed"
    run = Run.open(d)
    assert not run.complete and run.pending == ["previous_token"] and "first_token_sink" in run.results
    assert main(["show", str(d)]) == 0
    assert "incomplete run (probes not finished: previous_token)" in capsys.readouterr().out
    finished = (d / "first_token_sink.json").stat().st_mtime_ns
    stale = d / f".previous_token.json.{_dead_pid()}.abcd.tmp"  # what a kill mid-write leaves
    stale.write_text("{half")
    args = ["scan", "--model", model, "--prompts", str(prompts), "--out", str(d), "--quiet", "--resume"]
    assert main(args) == 0
    run = Run.open(d)
    assert run.complete and "previous_token" in run.results and not stale.exists()
    assert (d / "first_token_sink.json").stat().st_mtime_ns == finished  # the finished probe was not redone
    assert run["previous_token"].scores.shape == (2, 4)
    assert main(args) == 2 and "is complete; nothing to resume" in capsys.readouterr().err


def test_resume_refuses_other_prompts(killed_runs, tmp_path, capsys):
    root, model, _ = killed_runs
    d = tmp_path / "k"
    import shutil

    shutil.copytree(root / "killed", d)
    index = json.loads((d / "run.json").read_text())
    index["pending"], index["status"] = ["previous_token"], "incomplete"
    write_json(d / "run.json", index)
    other = tmp_path / "other.txt"
    other.write_text("Something else entirely.\n")
    code = main(["scan", "--model", model, "--prompts", str(other), "--out", str(d), "--quiet", "--resume"])
    assert code == 2 and "was scanned on other prompts" in capsys.readouterr().err


def test_killed_intervene_is_not_offered_by_the_app(killed_runs):
    """The intervention was saved but the run was killed before its report: the app does not offer it. Once a
    report is beside it (a finished run), it is offered."""
    from attnlab.apps.catalog import RunCatalog

    root, *_ = killed_runs
    catalog = RunCatalog.at(root)
    assert (root / "iv" / "intervention" / "intervention.json").exists()
    assert "iv" not in catalog.fitted_names()
    (root / "iv" / "report.json").write_text("{}")
    try:
        assert "iv" in catalog.fitted_names()
    finally:
        (root / "iv" / "report.json").unlink()


def test_scan_marks_its_probes_pending_before_computing(tmp_path, loaded, monkeypatch):
    """The run exists, incomplete, while the forward passes run (so a kill during compute leaves a run that says
    it is unfinished rather than no trace or an old complete index)."""
    from attnlab.capture import Capture

    seen = {}
    original = Capture.run

    def spy(self, *a, **k):
        seen.update(json.loads((tmp_path / "run.json").read_text()))
        return original(self, *a, **k)

    monkeypatch.setattr(Capture, "run", spy)
    attnlab.scan(loaded("llama-gqa"), "first_token_sink", SHORT_SENTENCES[:1], out=tmp_path, progress=False)
    assert seen["status"] == "incomplete" and seen["pending"] == ["first_token_sink"]
    assert Run.open(tmp_path).complete
