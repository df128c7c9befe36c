"""Sweep launchers: joblib runs cells in parallel for real; the SLURM config composes (no cluster here)."""
import json
import subprocess
import sys

from hydra import compose, initialize_config_dir

from amedlab.specs import CONF_DIR


def test_joblib_launcher_runs_a_parallel_sweep(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "amedlab", "-m", "hydra/launcher=local_parallel", "stage=compare", "compare.num_samples=32",
         "compare.nfes=[5]", "compare.solvers=[euler]", "schedule.rho=5,7", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    files = sorted(tmp_path.rglob("compare.json"))
    assert len(files) == 2
    rhos = sorted(json.loads(f.read_text())["schedule"]["rho"] for f in files)
    assert rhos == [5.0, 7.0]
    assert "Joblib.Parallel(n_jobs=2" in out.stdout


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 4 and launcher.timeout_min == 240
