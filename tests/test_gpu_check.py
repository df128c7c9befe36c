"""scripts/gpu_check.sh --dry-run: every command of the prepared GPU run composes, on the CPU."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_composes_every_command(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "arguments and grids OK" in out.stdout  # the throughput benchmark's arguments
    assert "44/44 cells compose and pass the checks" in out.stdout  # 11 solvers x NFE 3/5/7/9, device=cuda
    assert "dry run: every command composes" in out.stdout
    assert not (tmp_path / "out").exists()  # nothing written


def test_check_sweep_names_each_failing_cell():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "check_sweep.py"), "experiments=table2_digits",
                          "hydra/launcher=basic", "solver=euler,dpm2", "nfe=3,4"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1
    assert "FAIL experiments=table2_digits hydra/launcher=basic solver=dpm2 nfe=4 -> ConfigError: nfe=4 is not reachable" in out.stdout
    assert "3/4 cells compose and pass the checks" in out.stdout
