"""flaxpod installs as one package, `flaxpod.*`: a user's own `data/` or `model/` is never shadowed,
for an editable install (this test environment) and for a built wheel in a fresh environment."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERIC = ("data", "model", "train", "sharding", "tools")


def user_project(root: Path) -> Path:
    """A directory with its own `data` and `model` packages, as most ML projects have."""
    for name in ("data", "model"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"WHOSE = 'user {name}'\n")
    return root


CHECK = (
    "import data, model, flaxpod.data.tokenizer, flaxpod.model.transformer, flaxpod.train.cli; "
    "assert data.WHOSE == 'user data' and model.WHOSE == 'user model'; "
    "assert flaxpod.train.cli.main(['--help']) == 0"
)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_editable_install_leaves_user_packages_alone(tmp_path):
    project = user_project(tmp_path / "project")
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=project, capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finetune" in result.stdout


@pytest.mark.slow
def test_wheel_in_a_fresh_environment(tmp_path):
    dist = tmp_path / "dist"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(REPO),
    ]
    subprocess.run(build, check=True, capture_output=True, env=clean_env(), cwd=tmp_path)
    (wheel,) = dist.glob("flaxpod-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"flaxpod"}, tops  # nothing generic at the top level, and no tools/
    assert "flaxpod/train/finetune.py" in names and not any(n.startswith("flaxpod/tools") for n in names)

    # A fresh venv without pip: flaxpod from the wheel; its dependencies are this environment's
    # site-packages added by a .pth line (offline; .pth files inside them, like this checkout's
    # editable finder, are not processed, so this checkout cannot leak in).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, env=clean_env())

    project = user_project(tmp_path / "project")
    result = subprocess.run([python, "-c", CHECK], cwd=project, capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        str(venv)
        in subprocess.run(
            [python, "-c", "import flaxpod.train.cli as c; print(c.__file__)"],
            cwd=project,
            capture_output=True,
            text=True,
        ).stdout
    )  # flaxpod came from the wheel, not this checkout
    for name in GENERIC:  # outside a project, none of the generic names is importable
        r = subprocess.run([python, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode != 0 and f"No module named '{name}'" in r.stderr, (name, r.stderr[-500:])
    help_ = subprocess.run([venv / "bin" / "flaxpod", "--help"], cwd=project, capture_output=True, text=True)
    assert help_.returncode == 0 and "finetune" in help_.stdout
    module = subprocess.run([python, "-m", "flaxpod.train.pretrain", "--help"], cwd=project, capture_output=True)
    assert module.returncode == 0
