"""The real entry point and the real configs, on tiny settings."""
import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab.amed import AMEDPredictor
from amedlab.cli import resolve_stage
from amedlab.specs import CONF_DIR


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_compare_stage_through_the_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "amedlab", "stage=compare", "compare.num_samples=64", "compare.nfes=[3,5]",
         "compare.solvers=[euler,heun,ipndm]", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert set(result) == {"euler", "heun", "ipndm"}
    assert result["euler"]["5"]["nfe_counted"] == 5 and result["heun"]["5"]["num_points"] == 4
    assert 0 < result["ipndm"]["5"]["rmse"] < result["euler"]["3"]["rmse"]
    assert "| euler |" in out.stdout


def test_bad_stage_and_solver_are_named():
    with pytest.raises(ValueError, match="stage='sample'.*accepted: compare"):
        resolve_stage("sample")
    with pytest.raises(ValueError, match="solver.name='rk4'"):
        from amedlab.solvers.spec import solver_from_node

        solver_from_node({"name": "rk4"})


def test_distill_stage_with_the_real_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("stage=distill", "solver=amed", "schedule=time_uniform", "nfe=5", "distill.num_trajectories=64",
               "distill.batch_size=32", f"cache_dir={tmp_path / 'cache'}")
    loss = resolve_stage(cfg.stage)(cfg)
    assert loss > 0
    pred = AMEDPredictor.load(tmp_path / "predictor.pt")
    assert pred.meta["num_points"] == 4 and pred.meta["afs"] is True and pred.meta["M"] == 1
    assert pred.meta["schedule"]["kind"] == "time_uniform" and pred.meta["updates"] == 2 * 3
    record = json.loads((tmp_path / "distill.json").read_text())
    assert len(record["records"]) == 6 and {"r_mean", "c_mean", "a_mean"} <= set(record["records"][0])


def test_distill_stage_rejects_a_classical_solver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="stage=distill needs solver=amed or solver=amed_plugin"):
        resolve_stage("distill")(_cfg("stage=distill", "solver=euler"))


def test_python_api_distill_then_sample(tmp_path):
    import amedlab
    from amedlab.models.analytic import default_mixture
    from amedlab.solvers import make_solver

    model = default_mixture().float()
    pred = amedlab.distill(model, solver="amed_plugin", nfe=3, num_trajectories=64, batch_size=64, cache_dir=tmp_path)
    x = make_solver("amed_plugin", predictor=pred).sample(model, torch.randn(3, 2) * 80, torch.tensor(pred.meta["sigmas"]))
    assert x.shape == (3, 2) and torch.isfinite(x).all()


def test_help_lists_every_stage_and_version_is_the_package_version():
    import os

    from amedlab import __version__
    from amedlab.stages import STAGE_NAMES

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    helped = subprocess.run([sys.executable, "-m", "amedlab", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0 and "Stages:" in helped.stdout and len(helped.stdout.splitlines()) < 60
    assert all(f"\n  {name} " in helped.stdout for name in STAGE_NAMES), helped.stdout
    examples = helped.stdout.split("Examples:")[1].split("\n\n")[0].strip().splitlines()
    assert len(examples) == 5 and all(line.strip().startswith("amedlab ") for line in examples), examples
    assert 'eval "$(amedlab -sc install=bash)"' in helped.stdout
    console = subprocess.run([str(Path(sys.executable).parent / "amedlab"), "--help"], capture_output=True, text=True,
                             timeout=120)  # the console script prints the same page
    assert console.returncode == 0 and console.stdout == helped.stdout
    version = subprocess.run([sys.executable, "-m", "amedlab", "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"amedlab {__version__}"
