"""The installed package: a wheel built from this tree runs its stages from any folder, with no
source tree on the path, configs shipped inside it (`experiments=...` and `--config-dir` included)."""
import json
import shutil
import subprocess
import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from setuptools import find_packages

import amedlab
from amedlab.resources import EXPERIMENTS_ROOT
from amedlab.specs import CONF_DIR
from amedlab.specs import load_group

ROOT = Path(__file__).resolve().parents[1]

# Runs ``python -m amedlab ARGS`` with only TARGET providing amedlab: every other sys.path entry
# holding an amedlab (this checkout's src/, an editable install's path) and editable-install import
# hooks are dropped, and the import is checked before the stage starts.
DRIVER = """
import runpy, sys
from pathlib import Path
target = sys.argv[1]
sys.path[:] = [target] + [p for p in sys.path if p != target and not (Path(p or ".") / "amedlab").exists()]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
import amedlab
assert Path(amedlab.__file__).resolve().is_relative_to(Path(target).resolve()), amedlab.__file__
print("amedlab imported from", amedlab.__file__)
sys.argv = ["amedlab", *sys.argv[2:]]
runpy.run_module("amedlab", run_name="__main__", alter_sys=True)
"""


def test_source_checkout_uses_the_top_level_configs(tmp_path, monkeypatch):
    # edits to conf/ and experiments/ take effect without reinstalling, from any working folder
    assert Path(amedlab.__file__).resolve().is_relative_to(ROOT / "src")
    assert CONF_DIR == ROOT / "conf" and EXPERIMENTS_ROOT == ROOT
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiments=table2_digits"])
    assert cfg.model.name == "digits_unet" and cfg.eval.seeds == "0-1999"
    with pytest.raises(ValueError, match=r"solver='rk4' has no config file solver/rk4.yaml.*accepted: amed, amed_grid, amed_plugin, "):
        load_group("solver", "rk4")


def test_wheel_packages_cover_the_source_tree():
    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    listed = re.findall(r'"([^"]+)"', block)  # (tomllib is Python 3.11+; requires-python is 3.10)
    assert sorted(listed) == sorted(find_packages(str(ROOT / "src")) + ["amedlab.conf", "amedlab.conf.experiments"])


def _build_and_install(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"  # a copy: the build writes build/ and *.egg-info next to the sources
    tree.mkdir()
    shutil.copy(ROOT / "pyproject.toml", tree)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "results")
    for name in ("src", "conf", "experiments"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run = dict(capture_output=True, text=True, timeout=300)
    out = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(tree)], **run)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("amed_lab-*.whl")
    target = tmp_path / "site"
    out = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], **run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (target / "amedlab" / "conf" / "config.yaml").is_file()
    assert (target / "amedlab" / "conf" / "experiments" / "table2_digits.yaml").is_file()
    assert (target / "amedlab" / "assets" / "digits_teacher.safetensors").is_file()
    return target


def _amedlab(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", DRIVER, str(target), *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(cwd)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"amedlab imported from {target}" in out.stdout
    return out


def test_installed_wheel_runs_compare_and_an_evaluate_cell_from_another_folder(tmp_path):
    target = _build_and_install(tmp_path)
    work = tmp_path / "elsewhere"
    # a user's own config folder: an experiment and a solver of theirs, next to the shipped ones
    (work / "mine" / "experiments").mkdir(parents=True)
    (work / "mine" / "solver").mkdir()
    (work / "mine" / "experiments" / "quick.yaml").write_text(
        "# @package _global_\ncompare: {solvers: [euler_afs, ipndm], nfes: [3, 5], num_samples: 64}\n")
    (work / "mine" / "solver" / "euler_afs.yaml").write_text("name: euler\nafs: true\nfinal_step: sigma_min\noptions: {}\n")
    out = _amedlab(target, work, "--config-dir", "mine", "stage=compare", "experiments=quick", "hydra.run.dir=run_compare")
    result = json.loads((work / "run_compare" / "compare.json").read_text())
    assert set(result["results"]) == {"euler_afs", "ipndm"} and result["num_samples"] == 64
    assert result["results"]["euler_afs"]["5"]["nfe_counted"] == 5
    assert "| euler_afs |" in out.stdout

    # one cell of the digits Table 2 through the shipped experiment file (64 samples)
    _amedlab(target, work, "experiments=table2_digits", "stage=evaluate", "solver=ipndm", "nfe=5", "eval.seeds=0-63",
             "eval.batch_size=64", "eval.kid=false", "eval.ode_reference.nfe=10", "logger=none",
             "cache_dir=cache", "hydra.run.dir=run_cell")
    metrics = json.loads((work / "run_cell" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["nfe_counted"] == 5 and metrics["num_samples"] == 64
    assert metrics["model"]["name"] == "digits_unet" and 0 < metrics["fid"] < 200 and 0 < metrics["rmse"] < 1
    assert not (work / "conf").exists() and not (work / "outputs").exists()
