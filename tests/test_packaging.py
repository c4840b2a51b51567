"""The package runs once installed: the wheel carries the configuration, `mu-runner` is a command,
and a run from a directory outside the repository writes a valid metrics.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_subpackage_and_ships_the_configuration():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mu_runner").rglob("__init__.py")}
    assert listed == found | {"mu_runner.conf"}
    assert project["tool"]["setuptools"]["package-dir"] == {"mu_runner.conf": "conf"}
    assert project["project"]["scripts"]["mu-runner"] == "mu_runner.__main__:cli"
    assert "version" in project["project"]["dynamic"]  # written once: mu_runner.__version__


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(dist), str(ROOT)], check=True, capture_output=True)
    wheel = next(dist.glob("mu_runner-*.whl"))
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert "mu_runner/conf/config.yaml" in names and "mu_runner/conf/method/salun.yaml" in names

    env = tmp_path / "env"  # a fresh virtual environment; the dependencies come from this one's
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # plain path: no editable finder
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MU_RUNNER_ROOT")}
    where = subprocess.run([str(env / "bin" / "python"), "-c", "import mu_runner; print(mu_runner.__file__)"],
                           cwd=outside, env=clean, capture_output=True, text=True, check=True).stdout
    assert str(env) in where  # the installed copy, not the repository's
    help_ = subprocess.run([str(env / "bin" / "mu-runner"), "--help"], cwd=outside, env=clean,
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "method:" in help_.stdout and "salun" in help_.stdout
    run = subprocess.run([str(env / "bin" / "mu-runner"), "backbone=test_resnet", "trainer=tiny", "logger=none",
                          "callbacks=tiny", "method=finetune", "train.epochs=1", "eval.embedding=none",
                          "eval.feature_samples=100", "save_model=false", "hydra.run.dir=run"],
                         cwd=outside, env={**clean, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((outside / "run" / "metrics.json").read_text())
    assert metrics["method"] == "finetune" and 0 <= metrics["forget_acc"] <= 1
    assert (outside / "run" / "mu_runner.log").exists() and (outside / "outputs" / "cache").is_dir()
