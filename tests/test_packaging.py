"""attnlab installs like a library, without make: a wheel built from the source tree holds the bundled organisms as
package data, and installed into a fresh environment it gives a working ``attnlab`` command and API that load an
organism from the installed package (README: ``pip install .`` or ``pip install dist/attnlab-*.whl``).

The fresh environment installs the wheel alone (``--no-deps``) and borrows the locked dependencies from the test
environment through a path file, so the test needs no network and runs in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = out.glob("attnlab-*.whl")
    return path


def test_the_wheel_holds_the_package_and_the_bundled_organisms(wheel):
    from attnlab.models.bundled import BUNDLED_DIR

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "attnlab/__init__.py" in names and "attnlab/heads/inputs.py" in names
    for organism in sorted(p for p in BUNDLED_DIR.iterdir() if p.is_dir()):
        files = [f for f in organism.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        for f in files:
            assert f"attnlab/models/bundled/{f.relative_to(BUNDLED_DIR).as_posix()}" in names, f
    assert not any(n.startswith(("tests/", "examples/", "runs/")) for n in names)
    for asset in (ROOT / "attnlab" / "apps" / "assets").iterdir():  # the app's theme and key handler
        assert f"attnlab/apps/assets/{asset.name}" in names, asset
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "attnlab = attnlab.cli:main" in zipfile.ZipFile(wheel).read(meta).decode()


def test_an_installed_wheel_works_without_make(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    uv = Path(sys.executable).parent / "uv"
    install = [str(uv), "pip", "install", "-q", "--python", str(py), "--no-deps", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the locked dependencies, after the installed package (so the wheel's attnlab, not the source tree, is found)
    (Path(site) / "zz_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    clean["HF_HUB_OFFLINE"] = "1"
    where = subprocess.run(
        [str(py), "-c", "import attnlab, attnlab.models.bundled as b; print(attnlab.__file__); print(b.BUNDLED_DIR)"],
        cwd=work,
        env=clean,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert all(p.startswith(str(env_dir)) for p in where), where  # the installed copy, with its package data
    models = subprocess.run(
        [str(env_dir / "bin" / "attnlab"), "models"], cwd=work, env=clean, capture_output=True, text=True, timeout=300
    )
    assert models.returncode == 0, models.stderr
    assert "organism-induction" in models.stdout and "available" in models.stdout
    scan = subprocess.run(
        [str(env_dir / "bin" / "attnlab"), "scan", "--model", "organism-induction", "--probes", "induction"]
        + ["--dataset", "repeated-random", "--n-prompts", "2", "--out", "run", "--quiet"],
        cwd=work,
        env=clean,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert scan.returncode == 0, scan.stderr[-2000:]
    index = json.loads((work / "run" / "run.json").read_text())
    assert index["info"]["model"]["path"].startswith(str(env_dir)) and "induction" in index["results"]
