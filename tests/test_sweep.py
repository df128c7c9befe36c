"""A tiny Table 2 sweep end to end: the real experiment file, Hydra's multirun with the experiment's
launcher, AMED distillation inside a cell, resume after a lost cell, and stage=table on the result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab.specs import CONF_DIR
from amedlab.stages import table as table_stage
from amedlab.evaluation import uncertainty as U
from amedlab.models.digits import make_digits_denoiser, save_denoiser

REPO = Path(__file__).resolve().parents[1]
TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def amedlab(*args, env, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "amedlab", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    return save_denoiser(make_digits_denoiser(TINY_NET, sigma_data=0.75), tmp_path_factory.mktemp("model") / "tiny.safetensors")


def test_tiny_table2_sweep_resumes_and_tabulates(tmp_path, tiny_model, capsys):
    env = {**os.environ, "AMEDLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    sweep = tmp_path / "sweep"
    args = ["-m", "experiments=table2_digits", "solver=euler,amed", "nfe=3,5", "eval.seeds=0-31", "eval.batch_size=16",
            f"model.path={tiny_model}", f"sweep_dir={sweep}", "distill.num_trajectories=32", "distill.batch_size=16",
            "eval.ode_reference.nfe=6", "eval.kid_subsets=2"]
    amedlab(*args, env=env)
    cells = {p.parent.name: p for p in sweep.glob("*/metrics.json")}
    assert len(cells) == 4, sorted(cells)
    metrics = {}
    for name, path in cells.items():
        m = json.loads(path.read_text())
        assert m["complete"] and m["num_samples"] == 32 and m["nfe_counted"] == m["nfe"]
        assert m["fid"] > 0 and m["rmse"] > 0 and m["kid_subset_size"] == 32
        assert list(path.parent.glob("wandb/offline-run-*")), "wandb logged offline in the cell's directory"
        assert (path.parent / "samples.png").is_file()
        # the intervals and the per-sample data of paired comparisons, verified by their digest
        assert m["uncertainty"]["resamples"] == 500 and m["uncertainty"]["rmse"]["se"] > 0
        assert U.load_cell(m, path.parent)[0] is not None
        metrics[(m["solver"], m["nfe"])] = m
    assert set(metrics) == {("euler", 3), ("euler", 5), ("amed", 3), ("amed", 5)}
    # the paper's per-solver schedules, recorded as used
    assert metrics[("amed", 5)]["schedule"]["kind"] == "time_uniform" and metrics[("amed", 5)]["schedule"]["rho"] == 1.0
    assert metrics[("euler", 5)]["schedule"] == {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    assert metrics[("amed", 3)]["predictor"]["source"] in ("distilled", "cache")
    assert metrics[("amed", 5)]["num_points"] == 4 and metrics[("euler", 5)]["num_points"] == 6
    # every cell used the same cached high-NFE reference and real-data statistics
    assert len({m["ode_reference"]["cache_dir"] for m in metrics.values()}) == 1

    # a killed sweep: one cell lost its metrics; a re-run recomputes it and skips the others
    lost = metrics[("euler", 5)]
    lost_path = Path(cells[[n for n in cells if "nfe=5" in n and "solver=euler" in n][0]])
    lost_path.unlink()
    before = {n: p.stat().st_mtime_ns for n, p in cells.items() if p != lost_path}
    # (one joblib worker this time; the logger is not part of a cell's identity)
    out = amedlab(*args, "logger=none", "hydra.launcher.n_jobs=1", env=env)
    assert out.count("finished already") == 3
    assert {n: p.stat().st_mtime_ns for n, p in cells.items() if p != lost_path} == before
    again = json.loads(lost_path.read_text())
    assert again["fid"] == pytest.approx(lost["fid"], rel=1e-9) and again["rmse"] == pytest.approx(lost["rmse"], rel=1e-9)

    # stage=table on the result (in-process: the same run() the CLI dispatches to)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["stage=table", f"sweep_dir={sweep}"])
    assert table_stage.run(cfg) == pytest.approx(min(m["fid"] for m in metrics.values()), rel=1e-9)
    out = capsys.readouterr().out
    md = (sweep / "table2.md").read_text()
    assert md.splitlines()[2:4] == ["| NFE | 3 | 5 |", "|---|---|---|"]
    rows = [line for line in md.splitlines() if line.startswith("| DDIM (Euler) |") or line.startswith("| AMED-Solver |")]
    assert len(rows) == 4  # FID and RMSE tables, one row each
    for line in rows:
        assert len(line.split("|")) == 5 and "n/a" not in line and line.count(" ± ") == 2
    for name in ("table2.md", "table2.tex", "table2.csv", "fid_vs_nfe.png"):
        assert (sweep / name).is_file() and str(sweep / name) in out
    assert "| DDIM (Euler) |" in out  # the table is printed
