"""Census sweeps (attnlab.sweep): units merged exactly into the in-process census; on Ray, a killed worker's unit
runs again on a fresh one, a killed driver's sweep resumes without recomputing finished units, a second driver is
refused; the in-process sweep never imports Ray; a device-mapped model gives the same census.

The Ray tests share one Ray head started here on loopback (``ray start --head --block``, token authentication
with a token of this test's own), which the module stops at the end by ending the process it started."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import attnlab
from attnlab.census import Census, census
from attnlab.cli import main
from attnlab.datasets.base import PromptSet

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "The cat sat on the mat and the cat sat on the mat.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "One two three four five six seven.",
    "A B C D A B C D A B",
    "Hello world, hello again world.",
]
ARGS = dict(batch_size=2, causal_prompts=2)  # shards of one batch: 3 shards, the last one short


def same_json(x, y) -> bool:
    """Equal JSON-like values, numbers to float32 rounding (rel 1e-6)."""
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same_json(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return isinstance(y, list | tuple) and len(x) == len(y) and all(map(same_json, x, y))
    if isinstance(x, float) and isinstance(y, float):
        return x == y or math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(x) and math.isnan(y))
    return x == y


def assert_same_census(a: Census, b: Census) -> None:
    """Every statistic, reason, token result and provenance entry equal, times aside; grids to float32 rounding
    (rtol 1e-6): a shard batches its prompts with other neighbours than the whole census does, and a kept weights
    block's ``A @ v`` sums over the batch's padded length in another order."""
    assert list(a.scores) == list(b.scores)
    assert a.not_scored == b.not_scored
    for name, x in a.scores.items():
        y = b.scores[name]
        np.testing.assert_allclose(x.scores, y.scores, rtol=1e-6, atol=1e-9, err_msg=name)
        assert set(x.extra) == set(y.extra), name
        for k in x.extra:
            np.testing.assert_allclose(x.extra[k], y.extra[k], rtol=1e-6, atol=1e-9, err_msg=f"{name} {k}")
        untimed = lambda s: json.loads(json.dumps({k: v for k, v in s.items() if not k.startswith("seconds")}))
        assert same_json(untimed(x.summary), untimed(y.summary)), name
        assert (x.params, x.model, x.dataset, x.n_kv_heads, x.description) == (
            y.params,
            y.model,
            y.dataset,
            y.n_kv_heads,
            y.description,
        ), name
    assert list(a.tokens) == list(b.tokens)
    for name, x in a.tokens.items():
        y = b.tokens[name]
        assert (x.tokens, x.marks, x.prompt_index) == (y.tokens, y.marks, y.prompt_index), name
        np.testing.assert_allclose(x.values, y.values, rtol=1e-6, atol=1e-9, err_msg=name)
        assert same_json(json.loads(json.dumps(x.summary)), json.loads(json.dumps(y.summary))), name

    def info(c):
        out = {k: v for k, v in c.info.items() if not k.startswith("seconds") and k not in ("sweep", "causal")}
        causal = dict(c.info.get("causal") or {})
        causal.pop("seconds", None)
        return json.loads(json.dumps({**out, "causal": causal}, default=str))

    assert info(a) == info(b)


@pytest.fixture(scope="module")
def reference(loaded):
    """The uninterrupted in-process census of each tiny model on TEXTS."""
    cache = {}

    def get(arch: str) -> Census:
        if arch not in cache:
            cache[arch] = census(loaded(arch), TEXTS, progress=False, **ARGS)
        return cache[arch]

    return get


def test_in_process_sweep_equals_the_census_resumes_and_never_imports_ray(
    checkpoint_dir, reference, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now fails
    import attnlab.sweep as sw

    importlib.reload(sw)
    models = [str(checkpoint_dir / "gpt2"), str(checkpoint_dir / "llama-gqa")]
    out = tmp_path / "sweep"
    first = sw.sweep(models, TEXTS, out=out, shard_size=2, progress=False, **ARGS)
    assert len(first.computed) == 2 * (1 + 1 + 3) and not first.resumed  # causal, model, 3 shards per model
    for arch, m in zip(("gpt2", "llama-gqa"), models):
        assert_same_census(first[m], reference(arch))
        assert_same_census(Census.load(first.dirs[m]), reference(arch))
    again = sw.sweep(models, TEXTS, out=out, shard_size=2, progress=False, **ARGS)
    assert not again.computed and sorted(again.resumed) == sorted(first.computed)
    assert [e["unit"] for e in sw.SweepDir(out).log()] == first.computed  # every unit written once
    # another shard size is another set of units (content-addressed): only the new shard [0:4] is computed (the
    # causal and model units and the shard [4:5] are the same units as before), and the census is the same again
    third = sw.sweep(models[:1], TEXTS, out=out, shard_size=4, progress=False, **ARGS)
    assert len(third.computed) == 1 and len(third.resumed) == 3
    assert_same_census(third[models[0]], reference("gpt2"))


def test_partials_merge_in_any_shard_split(loaded):
    """Probe.partial / merge_partials / restore: a census of three shards restored into fresh probes gives the
    results of one pass over all the prompts, for every mergeable probe."""
    from attnlab.capture import Capture
    from attnlab.probes.base import ProbeContext
    from attnlab.probes.registry import PROBES
    from attnlab.probes.scan import prompt_batches

    model = loaded("qwen2")
    ps = PromptSet(name="t", texts=TEXTS)
    names = [n for n, cls in PROBES.items() if cls.mergeable]
    assert {"first_token_sink", "act_sinks", "massive_activations", "headvis", "max_attention_logit"} <= set(names)
    assert "retrieval_heads" not in names

    def run(start, stop):
        ctx = ProbeContext(model=model, n_prompts=len(TEXTS))
        capture = Capture(model, attention="fused", progress=False)
        probes = [PROBES[n]() for n in names]
        for p in probes:
            p.attach(capture, ctx)
        capture.run(prompt_batches(model, ps, 2, False, start, stop))
        return probes

    whole = run(0, len(TEXTS))
    parts = [run(0, 2), run(2, 4), run(4, 5)]
    ctx = ProbeContext(model=model, n_prompts=len(TEXTS))
    for i, name in enumerate(names):
        cls = PROBES[name]
        restored = cls()
        restored.restore(ctx, cls.merge_partials([p[i].partial() for p in parts]))
        for a, b in zip(whole[i].results(ctx), restored.results(ctx)):
            assert a.name == b.name
            values = (a.scores, b.scores) if hasattr(a, "scores") else (a.values, b.values)
            np.testing.assert_allclose(*values, rtol=0, atol=1e-12, err_msg=a.name)
            assert json.dumps(a.summary, sort_keys=True) == json.dumps(b.summary, sort_keys=True), a.name


def test_second_driver_on_a_directory_gets_one_line_and_exit_2(checkpoint_dir, tmp_path, capsys):
    from attnlab.sweep import SweepDir

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEXTS))
    holder = SweepDir(tmp_path / "sweep")
    holder.lock()  # a driver running on this directory
    try:
        rc = main(
            ["census", "--models", str(checkpoint_dir / "gpt2"), "--prompts", str(prompts)]
            + ["--out", str(tmp_path / "sweep"), "--quiet"]
        )
    finally:
        holder.unlock()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "in use by another sweep driver" in err[0], err
    assert not (tmp_path / "sweep" / "units").exists()


def test_bad_sweep_arguments_and_an_address_nothing_answers_at_give_one_line_and_exit_2(
    checkpoint_dir, tmp_path, capsys
):
    """Malformed worker counts, shares and addresses are refused by the argument types; a well-formed address where
    no Ray head listens is refused before the sweep directory is touched (``ray.init`` would retry for minutes)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEXTS))
    base = ["census", "--models", str(checkpoint_dir / "gpt2"), "--prompts", str(prompts), "--out", str(tmp_path / "s")]
    for extra, expect in [
        (["--workers", "0"], "--workers: must be a positive integer, got 0"),
        (["--threads-per-worker", "-1"], "--threads-per-worker: must be a positive integer"),
        (["--gpus-per-worker", "0"], "--gpus-per-worker: must be a positive number"),
        (["--gpus-per-worker", "inf"], "--gpus-per-worker: must be a finite number"),
        (["--shard-size", "0"], "--shard-size: must be a positive integer"),
        (["--cluster", "nonsense"], "--cluster: must be auto or HOST:PORT"),
        (["--cluster", "10.0.0.5:70000"], "--cluster: must be a port number (1-65535), got 70000"),
        (["--cluster", f"127.0.0.1:{_free_port()}"], "no Ray cluster answers at 127.0.0.1:"),
        (["--param", "massive_activations.ratio_threshold=10"], "--param applies to one model's census"),
    ]:
        t = time.perf_counter()
        rc = main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and expect in err[0], (extra, err)
        assert time.perf_counter() - t < 30, extra
        assert not (tmp_path / "s").exists(), extra


def test_dry_run_prints_the_units_and_estimates_without_computing(checkpoint_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEXTS))
    models = f"{checkpoint_dir / 'gpt2'},{checkpoint_dir / 'qwen2'}"
    rc = main(
        ["census", "--models", models, "--prompts", str(prompts), "--out", str(tmp_path / "s"), "--dry-run"]
        + ["--batch-size", "2", "--shard-size", "2", "--statistics", "sinks,headvis,causal"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if re.match(r"^[0-9a-f]{24} ", line)]
    assert [r[2] for r in rows] == ["causal", "model", "shard", "shard", "shard"] * 2, out
    assert "us per token" in out and "wall" in out
    assert not (tmp_path / "s" / "units").exists()


def test_device_map_passes_through_to_the_bridge_and_gives_the_same_census(checkpoint_dir, reference, monkeypatch):
    """An explicit map placing every module on the CPU reaches Hugging Face's from_pretrained through the bridge,
    and the census of the mapped model is the plain one."""
    from transformers import PreTrainedModel

    seen = []
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    plain = attnlab.load(str(checkpoint_dir / "llama-gqa"))
    layers = {f"model.layers.{i}": "cpu" for i in range(plain.n_layers)}
    dmap = {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = attnlab.load(str(checkpoint_dir / "llama-gqa"), device_map=dmap)
    assert seen == [None, dmap] and mapped.device == "cpu"
    assert_same_census(census(mapped, TEXTS, progress=False, **ARGS), reference("llama-gqa"))
    with pytest.raises(attnlab.AttnlabError, match="max_memory applies only"):
        attnlab.load(str(checkpoint_dir / "llama-gqa"), max_memory={"cpu": "1GiB"})


# ---- on Ray ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback for this module, this process connected. 4 logical CPUs: this process's two workers
    (one thread each, kept warm between its sweeps) and a subprocess driver's one."""
    env_before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    # token authentication with a token of this module's own: the head, this driver and the subprocess drivers
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = log = ray = None
    try:
        ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'attnlab[ray]')")
        from ray._raylet import Config

        Config.initialize("")  # Ray reads the authentication mode once per process: read it again
        ray_bin = Path(sys.executable).parent / "ray"
        if not ray_bin.exists():
            pytest.skip("the ray command is not installed beside this Python")
        port = _free_port()
        log = open(Path(tmp) / "head.log", "w")
        cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port)]
        cmd += ["--num-cpus", "4", "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats"]
        head = subprocess.Popen(cmd + ["--temp-dir", tmp], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.time() + 180
        while "Ray runtime started" not in Path(tmp, "head.log").read_text():
            if head.poll() is not None or time.time() > deadline:
                tail = Path(tmp, "head.log").read_text().strip().splitlines()[-1:]
                pytest.skip(f"ray start --head did not come up here: {tail}")
            time.sleep(0.5)
        address = f"127.0.0.1:{port}"
        ray.init(address=address, log_to_driver=False)
        yield address
    finally:
        if ray is not None:
            from attnlab.sweep import release_workers

            release_workers()
            if ray.is_initialized():
                ray.shutdown()
        if head is not None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops the head's processes when it ends
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait()
        if log is not None:
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


ARCHS = ("gpt2", "llama-gqa", "qwen2")
RAY = dict(workers=2, threads_per_worker=1, shard_size=2, progress=False, **ARGS)


def test_two_workers_on_three_models_give_the_in_process_census(ray_head, checkpoint_dir, reference, tmp_path):
    from attnlab.sweep import SweepDir, sweep

    models = [str(checkpoint_dir / a) for a in ARCHS]
    r = sweep(models, TEXTS, out=tmp_path / "s", **RAY)
    for arch, m in zip(ARCHS, models):
        assert_same_census(r[m], reference(arch))
    log = SweepDir(tmp_path / "s").log()
    assert len(log) == len(r.computed) == 3 * 5 and len({e["unit"] for e in log}) == 15
    assert len({e["worker"] for e in log}) == 2  # both workers took units


def test_a_worker_killed_mid_unit_has_its_unit_rerun_once(ray_head, checkpoint_dir, reference, tmp_path, monkeypatch):
    from attnlab.sweep import TEST_HOOK, SweepDir, sweep

    hook = tmp_path / "hook"
    monkeypatch.setenv(TEST_HOOK, f"{hook}:2")  # every unit announces itself, then sleeps 2 s mid-unit
    model = str(checkpoint_dir / "qwen2")
    box = {}

    def drive():
        try:
            box["result"] = sweep([model], TEXTS, out=tmp_path / "s", **RAY)
        except BaseException as e:  # reported by the assertion below
            box["error"] = e

    t = threading.Thread(target=drive)
    t.start()
    deadline = time.time() + 120
    while not (hook.is_dir() and any(hook.iterdir())):
        assert time.time() < deadline and t.is_alive(), box
        time.sleep(0.1)
    victim = next(hook.iterdir())
    key, pid = victim.name.split(".")
    os.kill(int(pid), signal.SIGKILL)  # kill -9 of the worker process mid-unit
    t.join(240)
    assert "error" not in box, box.get("error")
    assert_same_census(box["result"][model], reference("qwen2"))
    log = SweepDir(tmp_path / "s").log()
    assert len(log) == len({e["unit"] for e in log}) == 5  # each unit written once
    rerun = next(e for e in log if e["unit"] == key)
    assert rerun["attempt"] == 2 and rerun["worker"] != int(pid)
    starts = [p.name.split(".")[0] for p in hook.iterdir()]
    assert starts.count(key) == 2  # started on the killed worker, then once more on a fresh one


def test_killed_driver_resumes_on_a_cluster_and_a_second_driver_is_refused(
    ray_head, checkpoint_dir, reference, tmp_path, capsys
):
    from attnlab.sweep import TEST_HOOK, SweepDir

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEXTS))
    out = tmp_path / "s"
    models = f"{checkpoint_dir / 'gpt2'},{checkpoint_dir / 'llama-gqa'}"
    args = ["census", "--models", models, "--prompts", str(prompts), "--out", str(out), "--cluster", ray_head]
    # one worker: the subprocess driver starts one actor (an actor's start-up, importing torch and TransformerLens,
    # is most of this test's time); the re-run takes one of this process's warm workers
    args += ["--workers", "1", "--threads-per-worker", "1"]
    args += ["--batch-size", "2", "--shard-size", "2", "--causal-prompts", "2", "--quiet"]
    env = {**os.environ, TEST_HOOK: f"{tmp_path / 'hook'}:1"}
    driver = subprocess.Popen([sys.executable, "-m", "attnlab", *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while len(list((out / "units").glob("*.json"))) < 3:
            assert driver.poll() is None, driver.stderr.read()
            assert time.time() < deadline, "the driver wrote no units"
            time.sleep(0.2)
        assert main(args) == 2  # a second driver on the same directory, while the first runs
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another sweep driver" in err[0], err
    finally:
        driver.kill()  # kill -9 of the driver mid-sweep
        driver.wait()
    killed_at = time.time()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()}
    done = {p.stem for p in (out / "units").glob("*.json")}
    assert 3 <= len(done) < 10
    assert main(args) == 0  # the same command again (here, on this process's warm workers): resumes
    after = {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()}
    assert all(after[name] == t for name, t in before.items() if Path(name).stem in done)
    log = SweepDir(out).log()
    keys = [e["unit"] for e in log]
    plan = json.loads((out / "sweep.json").read_text())
    assert len(keys) == len(set(keys))  # no unit written twice
    assert set(keys) | done == {u["key"] for u in plan["units"]} and len(plan["units"]) == 10
    assert not {e["unit"] for e in log if e["written"] > killed_at} & done  # finished units not recomputed
    for arch in ("gpt2", "llama-gqa"):
        model = str(checkpoint_dir / arch)
        assert_same_census(Census.load(out / plan["models"][model]["census"]), reference(arch))
