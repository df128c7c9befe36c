"""Every bad input of tests/test_reliability.py through the real command line (python -m amedlab).

    PYTHONPATH=src python scripts/bad_inputs_cli.py

Counts: inputs tried, named errors (non-zero exit, exactly one "error: " line naming the key),
tracebacks, silent results (exit 0) and runs that wrote a file other than Hydra's own (.hydra/, .log).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import test_reliability as T  # noqa: E402
files = T.files.__wrapped__(type("F", (), {"mktemp": lambda self, n: Path(tempfile.mkdtemp())})())
stats = {"tried": 0, "named": 0, "traceback": 0, "silent": 0, "files_written": 0}
for stage, extra, key in T.CASES:
    run = Path(tempfile.mkdtemp())
    args = T._overrides(stage, extra, files, run) + [f"hydra.run.dir={run}/out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AMEDLAB_CACHE": str(run / "cache")}
    p = subprocess.run([sys.executable, "-m", "amedlab", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    stats["tried"] += 1
    errs = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    if p.returncode != 0 and len(errs) == 1 and key in errs[0]:
        stats["named"] += 1
    else:
        print("NOT NAMED", extra, p.returncode, p.stderr[-500:])
    if "Traceback" in p.stderr:
        stats["traceback"] += 1
    if p.returncode == 0:
        stats["silent"] += 1
    written = [q for q in run.rglob("*") if q.is_file() and ".hydra" not in q.parts and q.suffix != ".log"]
    if written:
        stats["files_written"] += 1; print("WROTE", extra, written[:3])
print(json.dumps(stats))
