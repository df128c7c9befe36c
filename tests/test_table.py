"""stage=table on a small fake sweep directory: the expected markdown, LaTeX, CSV and plot."""
import csv
import io
import json

import pytest
from hydra import compose, initialize_config_dir

from amedlab.cache import digest, seal
from amedlab.specs import CONF_DIR
from amedlab.evaluation.evaluate import METRICS_FORMAT
from amedlab.stages import table as table_stage
from amedlab.evaluation.table import write_tables

# (solver, label, nfe, fid, rmse): deliberately out of the paper's order on disk
CELLS = [
    ("ipndm", "iPNDM", 3, 47.98, 0.30),
    ("ipndm", "iPNDM", 5, 13.59, 0.20),
    ("euler", "DDIM (Euler)", 3, 93.36, 0.50),
    ("euler", "DDIM (Euler)", 5, 49.66, 0.40),
    ("amed", "AMED-Solver", 3, 18.49, 0.25),
    ("amed", "AMED-Solver", 5, 7.59, 0.21),
]


def write_cell(root, solver, label, nfe, fid, rmse, complete=True, overrides=None):
    cell = root / f"nfe={nfe},solver={solver}"
    cell.mkdir(parents=True, exist_ok=True)
    metrics = {"complete": complete, "label": label, "solver": solver, "nfe": nfe, "fid": fid, "kid_mean": fid / 1000,
               "kid_std": 0.0, "rmse": rmse, "num_samples": 2000, "feature_extractor": "amedlab-digits",
               "model": {"name": "digits_unet"}, "real_data": {"split": "train"},
               "schedule": {"kind": "time_uniform" if solver == "amed" else "polynomial", "rho": 1.0 if solver == "amed" else 7.0},
               "overrides": overrides or [f"solver={solver}", f"nfe={nfe}", "experiments=table2_digits"],
               "format": METRICS_FORMAT, "solver_config": {"name": solver}, "uncertainty": None}
    metrics["cell_key"] = digest([str(cell), solver, nfe])  # one key per cell, as stage=evaluate writes
    (cell / "metrics.json").write_text(json.dumps(seal(metrics)))  # sealed, as stage=evaluate writes it
    return cell


@pytest.fixture()
def fake_sweep(tmp_path):
    root = tmp_path / "sweep"
    for c in CELLS:
        write_cell(root, *c)
    # an unfinished cell (no metrics yet), a half-written file, and an incomplete one: all ignored
    (root / "nfe=7,solver=ipndm").mkdir()
    (root / "nfe=9,solver=ipndm").mkdir()
    (root / "nfe=9,solver=ipndm" / "metrics.json").write_text('{"complete": true, "fid": 1')
    write_cell(root / "other", "heun", "EDM (Heun, AFS)", 5, 1.0, 0.01, complete=False)
    return root


EXPECTED_FID = """| NFE | 3 | 5 |
|---|---|---|
| DDIM (Euler) | 93.36 | 49.66 |
| iPNDM | 47.98 | 13.59 |
| AMED-Solver | **18.49** | **7.59** |"""

EXPECTED_RMSE = """| NFE | 3 | 5 |
|---|---|---|
| DDIM (Euler) | 0.5 | 0.4 |
| iPNDM | 0.3 | **0.2** |
| AMED-Solver | **0.25** | 0.21 |"""


def test_table_from_a_fake_sweep(fake_sweep):
    result = write_tables(fake_sweep, metrics=["fid", "rmse"])
    md = result["markdown"]
    assert EXPECTED_FID in md and EXPECTED_RMSE in md
    assert md.index("**FID (model digits_unet, 2000 samples per cell, amedlab-digits features") < md.index("**RMSE")
    assert (fake_sweep / "table2.md").read_text() == md

    tex = (fake_sweep / "table2.tex").read_text()
    assert "NFE & 3 & 5 \\\\" in tex
    assert "AMED-Solver & \\textbf{18.49} & \\textbf{7.59} \\\\" in tex
    assert "DDIM (Euler) & 93.36 & 49.66 \\\\" in tex and tex.count("\\begin{tabular}{lcc}") == 2

    rows = list(csv.DictReader(io.StringIO((fake_sweep / "table2.csv").read_text())))
    assert [(r["solver"], r["nfe"]) for r in rows] == [("euler", "3"), ("euler", "5"), ("ipndm", "3"), ("ipndm", "5"),
                                                       ("amed", "3"), ("amed", "5")]
    best = {(r["solver"], r["nfe"]): (r["best_fid"], r["best_rmse"]) for r in rows}
    assert best[("amed", "5")] == ("1", "0") and best[("ipndm", "5")] == ("0", "1") and best[("amed", "3")] == ("1", "1")
    # cells without per-sample data: bold is the lowest value, marked as untested, and said so under the table
    assert {r["mark_fid"] for r in rows if r["best_fid"] == "1"} == {"lowest"} and rows[0]["fid_lo"] == ""
    assert "No intervals" in md and "not tested" in md
    assert float(rows[0]["fid"]) == 93.36 and rows[4]["schedule"] == "time_uniform"

    png = fake_sweep / "fid_vs_nfe.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_rows_split_by_differing_overrides_and_missing_cells_show_na(tmp_path):
    root = tmp_path / "sweep"
    for rho in (5, 7):
        for nfe, fid in ((3, 40.0 + rho), (5, 10.0 + rho)):
            write_cell(root / f"rho{rho}", "ipndm", "iPNDM", nfe, fid, 0.1,
                       overrides=["solver=ipndm", f"nfe={nfe}", f"schedule.rho={rho}", "eval.batch_size=100"])
    write_cell(root / "euler", "euler", "DDIM (Euler)", 3, 90.0, 0.5,
               overrides=["solver=euler", "nfe=3", "schedule.rho=7", "eval.batch_size=100"])
    md = write_tables(root, metrics=["fid"])["markdown"]
    assert "| DDIM (Euler) [schedule.rho=7] | 90 | n/a |" in md
    assert "| iPNDM [schedule.rho=5] | **45** | **15** |" in md
    assert "| iPNDM [schedule.rho=7] | 47 | 17 |" in md


def test_table_stage_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["stage=table"])
        with pytest.raises(ValueError, match="sweep_dir="):
            table_stage.run(cfg)
        (tmp_path / "empty").mkdir()
        cfg = compose("config", overrides=["stage=table", f"sweep_dir={tmp_path / 'empty'}"])
        with pytest.raises(ValueError, match="holds no complete metrics.json"):
            table_stage.run(cfg)
        cfg = compose("config", overrides=["stage=table", f"sweep_dir={tmp_path / 'nowhere'}"])
        with pytest.raises(FileNotFoundError, match="no such directory"):
            table_stage.run(cfg)
