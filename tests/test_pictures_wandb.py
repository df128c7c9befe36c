"""The sweep's pictures and what wandb gets: each cell's preview (written with its metrics, added to a
finished cell without recomputing them, verified by the table), samples_by_solver.png (the table's rows
against its NFE, the same seeds in every cell), the plots' legend outside the data, Table 2 with its
intervals as a wandb.Table, and the distillation curves on their own step."""
import csv
import io
import json
import logging

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab.cache import digest, seal
from amedlab.evaluation import plots
from amedlab.evaluation.evaluate import METRICS_FORMAT, PREVIEW_COUNT, PREVIEW_FILE, read_preview, write_preview
from amedlab.evaluation.table import CSV_FIELDS, write_tables
from amedlab.models.digits import make_digits_denoiser, save_denoiser
from amedlab.specs import CONF_DIR
from amedlab.stages import evaluate as evaluate_stage
from amedlab.stages import table as table_stage

TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def cell_images(solver: str, nfe: int, seeds) -> np.ndarray:
    """Images that say which cell and seed they are (uint8 [K, 1, 8, 8])."""
    rng = np.random.default_rng([sum(map(ord, solver)), nfe])
    out = rng.integers(0, 256, (len(seeds), 1, 8, 8), dtype=np.uint8)
    out[:, 0, 0, :] = np.asarray(seeds, np.uint8)[:, None]  # the seed in the first row of pixels
    return out


def write_cell(root, solver, label, nfe, fid, rmse, seeds=tuple(range(PREVIEW_COUNT)), preview=True, se=None):
    """A finished cell as stage=evaluate writes it: sealed metrics.json, and (``preview``) preview.npz
    recorded in it; ``se``: (fid se, rmse se) of an interval."""
    cell = root / f"nfe={nfe},solver={solver}"
    cell.mkdir(parents=True, exist_ok=True)
    metrics = {"complete": True, "format": METRICS_FORMAT, "label": label, "solver": solver, "nfe": nfe, "fid": fid,
               "kid_mean": None, "kid_std": None, "rmse": rmse, "num_samples": 64, "feature_extractor": "amedlab-digits",
               "model": {"name": "digits_unet"}, "real_data": {"split": "train"}, "schedule": {"kind": "polynomial", "rho": 7.0},
               "overrides": [f"solver={solver}", f"nfe={nfe}"], "solver_config": {"name": solver},
               "cell_key": digest([str(cell), solver, nfe]), "uncertainty": None}
    if se is not None:
        metrics["uncertainty"] = {"fid": {"samples": {"se": se[0]}}, "rmse": {"se": se[1]}}
    if preview:
        metrics["preview"] = write_preview(cell, cell_images(solver, nfe, seeds), list(seeds))
    (cell / "metrics.json").write_text(json.dumps(seal(metrics)))
    return cell


# ------------------------------------------------------------------------------------------------
# samples_by_solver.png
# ------------------------------------------------------------------------------------------------

def test_samples_by_solver_shows_the_table_rows_with_the_same_seeds_and_names_the_blank_cells(tmp_path, caplog):
    root = tmp_path / "sweep"
    for solver, label in (("ipndm", "iPNDM"), ("euler", "DDIM (Euler)"), ("amed", "AMED-Solver")):
        for nfe in (3, 5):
            write_cell(root, solver, label, nfe, 10.0 / nfe + len(solver), 0.1)
    old = write_cell(root, "heun", "EDM (Heun)", 3, 50.0, 0.3, preview=False)        # evaluated before previews
    other = write_cell(root, "heun", "EDM (Heun)", 5, 40.0, 0.3, seeds=range(100, 108))  # other eval.seeds
    write_cell(root, "midpoint", "Midpoint", 3, 60.0, 0.4)                              # NFE 5 not run
    damaged = root / "nfe=5,solver=ipndm" / PREVIEW_FILE
    data = bytearray(damaged.read_bytes())
    data[-40] ^= 0xFF
    damaged.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="amedlab.evaluation.table"):
        result = write_tables(root, metrics=["fid"])
    pic = result["picture"]
    labels = ["DDIM (Euler)", "EDM (Heun)", "Midpoint", "iPNDM", "AMED-Solver"]
    assert pic["labels"] == list(result["rows"]) == labels and pic["nfes"] == result["nfes"] == [3, 5]
    assert pic["seeds"] == list(range(PREVIEW_COUNT))
    solver_of = {"DDIM (Euler)": "euler", "iPNDM": "ipndm", "AMED-Solver": "amed", "Midpoint": "midpoint"}
    shown = {("DDIM (Euler)", 3), ("DDIM (Euler)", 5), ("iPNDM", 3), ("AMED-Solver", 3), ("AMED-Solver", 5), ("Midpoint", 3)}
    assert set(pic["images"]) == shown
    for label, n in shown:  # each cell shows its own first images, read back exactly
        assert np.array_equal(pic["images"][(label, n)], cell_images(solver_of[label], n, range(PREVIEW_COUNT)))
    assert pic["notes"] == {("EDM (Heun)", 3): "no preview", ("EDM (Heun)", 5): "other seeds", ("Midpoint", 5): "not run",
                            ("iPNDM", 5): "preview failed\nits check"}
    # one warning per kind of blank cell, naming the cells and their files
    warnings = [r.getMessage() for r in caplog.records if "samples_by_solver.png" in r.getMessage()]
    assert len(warnings) == 3
    no_preview = next(w for w in warnings if "no preview" in w)
    assert "EDM (Heun) NFE 3" in no_preview and str(old / "metrics.json") in no_preview and "NFE 5" not in no_preview
    seeds = next(w for w in warnings if "other seeds" in w)
    assert "EDM (Heun) NFE 5 (seeds 100-107" in seeds and str(other / "metrics.json") in seeds and "seeds 0-7" in seeds
    failed = next(w for w in warnings if "fails its check" in w)
    assert "iPNDM NFE 5" in failed and "does not match the digest" in failed

    png = root / "samples_by_solver.png"
    assert result["paths"]["samples_by_solver"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the figure: NFE headers, the rows' labels in the table's order, each cell's images as drawn
    fig = plots.samples_by_solver_figure(pic["labels"], pic["nfes"], pic["images"], pic["notes"])
    try:
        axes = np.asarray(fig.axes).reshape(len(labels), 2)
        assert [ax.get_title() for ax in axes[0]] == ["NFE 3", "NFE 5"]
        assert [ax.get_ylabel() for ax in axes[:, 0]] == labels
        for i, label in enumerate(labels):
            for j, n in enumerate((3, 5)):
                ax = axes[i][j]
                if (label, n) in shown:
                    drawn = np.asarray(ax.images[0].get_array())
                    assert np.array_equal(drawn, plots.grid_canvas(pic["images"][(label, n)], plots.STRIP_COLUMNS)[..., 0])
                else:
                    assert not ax.images and [t.get_text() for t in ax.texts] == [pic["notes"][(label, n)]]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_a_preview_that_does_not_match_its_record_is_refused(tmp_path):
    cell = write_cell(tmp_path, "euler", "DDIM (Euler)", 3, 1.0, 0.1)
    m = json.loads((cell / "metrics.json").read_text())
    (images, seeds), why = read_preview(m, cell)
    assert why is None and seeds == list(range(PREVIEW_COUNT)) and images.dtype == np.uint8
    assert read_preview({k: v for k, v in m.items() if k != "preview"}, cell)[1].startswith("no preview")
    # another cell's (valid) preview copied over this one's: the digest in metrics.json tells
    other = write_cell(tmp_path, "heun", "EDM (Heun)", 3, 1.0, 0.1)
    (cell / PREVIEW_FILE).write_bytes((other / PREVIEW_FILE).read_bytes())
    assert "does not match the digest" in read_preview(m, cell)[1]
    (cell / PREVIEW_FILE).unlink()
    assert "missing" in read_preview(m, cell)[1]
    # a file name in metrics.json never reaches outside the cell's folder
    assert "missing" in read_preview({**m, "preview": {**m["preview"], "file": "../../etc/passwd"}}, cell)[1]


# ------------------------------------------------------------------------------------------------
# stage=evaluate: the preview, and a finished cell gaining one without recomputing its metrics
# ------------------------------------------------------------------------------------------------

def _old_cell(run_dir) -> dict:
    """Make the finished cell look as one written before previews were kept; returns its metrics."""
    path = run_dir / "metrics.json"
    m = json.loads(path.read_text())
    m.pop("preview")
    path.write_text(json.dumps(seal(m), indent=2))
    (run_dir / PREVIEW_FILE).unlink()
    return m


def test_evaluate_keeps_a_preview_and_a_finished_cell_gains_one_without_recomputing(tmp_path, monkeypatch, model_calls):
    torch.manual_seed(0)
    model_path = save_denoiser(make_digits_denoiser(TINY_NET, sigma_data=0.75), tmp_path / "tiny.safetensors")
    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)  # run_dir() outside Hydra is the current directory
    monkeypatch.setenv("AMEDLAB_CACHE", str(tmp_path / "cache"))
    base = ["stage=evaluate", "model=digits_unet", f"model.path={model_path}", "solver=euler", "nfe=3", "eval.seeds=0-11",
            "eval.batch_size=12", "eval.kid_subsets=2", "eval.ode_reference.nfe=6", "eval.bootstrap.resamples=20"]

    def run(*extra):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=base + list(extra))
        model_calls["n"] = 0
        evaluate_stage.run(cfg)
        return json.loads((run_dir / "metrics.json").read_text())

    first = run("eval.save_samples=true")
    info = first["preview"]
    assert info["seeds"] == list(range(PREVIEW_COUNT)) and info["source"] == "cell" and info["shape"] == [1, 8, 8]
    (images, seeds), why = read_preview(first, run_dir)
    assert why is None
    with np.load(run_dir / "samples.npz") as z:  # the cell's own first images, with their seeds
        assert np.array_equal(images, z["images"][:PREVIEW_COUNT]) and list(z["seeds"][:PREVIEW_COUNT]) == seeds
    assert np.array_equal(plots.grid_tiles(run_dir / "samples.png", PREVIEW_COUNT, [1, 8, 8]), images)
    unchanged = {k: v for k, v in first.items() if k not in ("preview", "digest")}

    # a finished cell without a preview: it is read back from samples.npz, then samples.png; no model call
    for extra, gone, source in ((["eval.save_samples=true"], None, "samples.npz"),
                                (["eval.save_samples=false"], "samples.npz", "samples.png")):
        old = _old_cell(run_dir)
        if gone:
            (run_dir / gone).unlink()
        again = run(*extra)
        assert model_calls["n"] == 0, "finished: no sampling, nothing recomputed"
        assert {k: v for k, v in again.items() if k not in ("preview", "digest")} == unchanged
        assert again["preview"]["source"] == source and "preview" not in old
        got, why = read_preview(again, run_dir)
        assert why is None and np.array_equal(got[0], images) and got[1] == seeds

    # neither file: the first batch is sampled again (the same batch: the same images); the metrics stand
    _old_cell(run_dir)
    (run_dir / "samples.png").unlink()
    again = run("eval.sample_grid=0")
    assert model_calls["n"] == 3, "one batch of 12 seeds at NFE 3, nothing else"
    assert {k: v for k, v in again.items() if k not in ("preview", "digest")} == unchanged
    assert again["preview"]["source"] == "regenerated" and np.array_equal(read_preview(again, run_dir)[0][0], images)

    # a cell with its preview is left untouched
    mtime = (run_dir / "metrics.json").stat().st_mtime_ns
    run("eval.sample_grid=0")
    assert model_calls["n"] == 0 and (run_dir / "metrics.json").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------------------
# The plots' legend
# ------------------------------------------------------------------------------------------------

def test_the_plot_legend_lies_outside_the_axes_and_inside_the_saved_picture(tmp_path):
    from matplotlib.transforms import Bbox

    labels = ["DDIM (Euler)", "EDM (Heun, AFS)", "Midpoint", "DPM-Solver-2", "DPM-Solver++(2M)", "DPM-Solver++(3M)",
              "UniPC", "iPNDM", "AMED-Solver", "AMED-Plugin", "Learned [schedule.rho=3]"]
    nfes = [3, 4, 5, 6, 7, 8, 9]
    series = {label: {n: 80.0 / (n * (k + 1)) for n in nfes} for k, label in enumerate(labels)}
    errors = {label: {n: 0.1 * v for n, v in pts.items()} for label, pts in series.items()}
    fig = plots.metric_vs_nfe_figure(series, "FID", errors=errors, error_label="95% interval over seeds")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == labels
        box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not box.overlaps(axes_box), f"the legend {box} covers the axes {axes_box}"
        # and it is not cut off: inside what bbox_inches="tight" saves
        saved = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
        assert Bbox.union([saved, box]).bounds == pytest.approx(saved.bounds)
        # every point is drawn inside the axes, so none is under the legend
        for line in ax.get_lines():
            xy = ax.transData.transform(line.get_xydata())
            assert not any(box.contains(x, y) for x, y in xy)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    path = plots.metric_vs_nfe_png(series, tmp_path / "fid.png", "FID", errors=errors, error_label="95%")
    from PIL import Image

    with Image.open(path) as img:  # the saved picture is wider than the axes: the legend is in it
        assert img.width > axes_box.width + box.width


# ------------------------------------------------------------------------------------------------
# wandb (offline): Table 2 with its intervals, the pictures, the distillation curves' step
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def wandb_calls(monkeypatch):
    """Every ``run.log`` payload and ``run.define_metric`` call of wandb runs in this test (the runs are
    real, offline), and the file each ``wandb.Image`` was made from."""
    import wandb
    from wandb.sdk.wandb_run import Run

    calls = {"log": [], "define_metric": []}
    log, define = Run.log, Run.define_metric

    def spy_log(self, data, *args, **kwargs):
        calls["log"].append(dict(data))
        return log(self, data, *args, **kwargs)

    def spy_define(self, name, *args, **kwargs):
        calls["define_metric"].append((name, kwargs))
        return define(self, name, *args, **kwargs)

    class Image(wandb.Image):
        def __init__(self, data_or_path, *args, **kwargs):
            self.source_path = str(data_or_path)
            super().__init__(data_or_path, *args, **kwargs)

    monkeypatch.setattr(Run, "log", spy_log)
    monkeypatch.setattr(Run, "define_metric", spy_define)
    monkeypatch.setattr(wandb, "Image", Image)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return calls


def test_table_stage_logs_table2_with_its_intervals_and_the_pictures_to_wandb(tmp_path, monkeypatch, wandb_calls):
    root = tmp_path / "sweep"
    for k, (solver, label) in enumerate((("euler", "DDIM (Euler)"), ("ipndm", "iPNDM"))):
        for nfe in (3, 5):
            write_cell(root, solver, label, nfe, 40.0 / nfe + 7 * k, 0.3 / nfe + 0.01 * k, se=(0.5 + k + nfe / 10, 0.01 * nfe))
    write_cell(root, "amed", "AMED-Solver", 3, 9.0, 0.05)  # no interval recorded: None, as the CSV's empty field
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["stage=table", f"sweep_dir={root}", "logger=wandb", "logger.mode=offline"])
    table_stage.run(cfg)
    assert list((root / "wandb").glob("offline-run-*")), "an offline run in the sweep folder"
    logged = {k: v for payload in wandb_calls["log"] for k, v in payload.items()}

    lines = list(csv.reader(io.StringIO((root / "table2.csv").read_text())))
    header, body = lines[0], lines[1:]
    cells = logged["table2/cells"]
    assert cells.columns == header == list(CSV_FIELDS)
    # every value as table2.csv writes it (None is the CSV's empty field): the same intervals, marks, diffs
    assert [["" if v is None else str(v) for v in row] for row in cells.data] == body
    by_cell = {(r["label"], int(r["nfe"])): r for r in csv.DictReader(io.StringIO((root / "table2.csv").read_text()))}
    assert by_cell[("iPNDM", 5)]["fid_lo"] != "" and by_cell[("AMED-Solver", 3)]["fid_lo"] == ""

    for metric, col in (("fid", "fid"), ("rmse", "rmse")):
        table = logged[f"table2/{metric}"]
        assert table.columns == ["solver", "NFE 3", "NFE 3 lo", "NFE 3 hi", "NFE 5", "NFE 5 lo", "NFE 5 hi"]
        assert [row[0] for row in table.data] == ["DDIM (Euler)", "iPNDM", "AMED-Solver"]
        for row in table.data:
            for j, n in enumerate((3, 5)):
                value, lo, hi = row[1 + 3 * j: 4 + 3 * j]
                line = by_cell.get((row[0], n))
                if line is None:  # AMED-Solver at NFE 5: not run
                    assert (value, lo, hi) == (None, None, None)
                    continue
                assert value == float(line[col])
                assert (lo, hi) == ((float(line[f"{col}_lo"]), float(line[f"{col}_hi"])) if line[f"{col}_lo"] else (None, None))
                if lo is not None:
                    assert lo < value < hi
    for key, name in (("table2/fid_vs_nfe", "fid_vs_nfe.png"), ("table2/rmse_vs_nfe", "rmse_vs_nfe.png"),
                      ("table2/samples_by_solver", "samples_by_solver.png")):
        assert logged[key].source_path == str(root / name) and (root / name).is_file()


def test_distillation_curves_are_drawn_against_their_own_update_count(tmp_path, wandb_calls):
    from amedlab.wandb_logger import make_logger

    records = [{"interval": i % 2, "epoch": i // 4, "loss": 1.0 / (i + 1), "r_mean": 0.5} for i in range(6)]
    with make_logger({"name": "wandb", "mode": "offline"}, "distill-test", None, "test", tmp_path) as logger:
        logger.log_distillation(records, "learned")
    assert wandb_calls["define_metric"] == [("learned/update", {}), ("learned/*", {"step_metric": "learned/update"})]
    points = [p for p in wandb_calls["log"] if "learned/update" in p]
    assert [p["learned/update"] for p in points] == list(range(6))
    assert [p[f"learned/interval_{i % 2}/loss"] for i, p in enumerate(points)] == [r["loss"] for r in records]
    assert points[5]["learned/interval_1/epoch"] == 1
