"""Numbers you can trust: stage=table and stage=compare_cells tabulate only sealed, complete cells of the
current format, name every file they skip, refuse two configurations under one row label, and check
every input before any work (one ``error:`` line, exit status 2, nothing written).

The sweeps are written here by hand, as stage=evaluate writes them (sealed with amedlab.cache.seal),
so no model runs."""
from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from amedlab import cli
from amedlab.cache import digest, seal
from amedlab.specs import CONF_DIR
from amedlab.errors import ConfigError
from amedlab.evaluation import compare_cells as CC
from amedlab.evaluation.evaluate import METRICS_FORMAT
from amedlab.evaluation.table import SKIP_KINDS, build_rows, classify, write_tables
from amedlab.specs import CHECKS, check_stage

LABELS = {"ipndm": "iPNDM", "euler": "DDIM (Euler)", "heun": "EDM (Heun)"}
# (folder, solver, nfe, fid, rmse): the good cells; no uncertainty recorded (they still tabulate, without intervals)
GOOD = [("nfe=3,solver=ipndm", "ipndm", 3, 41.5, 0.31), ("nfe=5,solver=ipndm", "ipndm", 5, 12.25, 0.21),
        ("nfe=3,solver=euler", "euler", 3, 93.5, 0.52), ("nfe=5,solver=euler", "euler", 5, 49.75, 0.41)]


def cell_record(name, solver, nfe, fid, rmse, **changes) -> dict:
    """A finished cell's metrics.json content, before sealing (the fields the table reads and a few more)."""
    record = {"complete": True, "format": METRICS_FORMAT, "cell_key": digest([name, solver, nfe]),
              "label": LABELS[solver], "solver": solver, "nfe": nfe, "fid": fid, "kid_mean": None, "kid_std": None,
              "rmse": rmse, "num_samples": 100, "feature_extractor": "amedlab-digits", "model": {"name": "digits_unet"},
              "real_data": {"split": "train"}, "schedule": {"kind": "polynomial", "rho": 7.0},
              "solver_config": {"name": solver, "afs": False, "final_step": "sigma_min"}, "uncertainty": None,
              "overrides": [f"solver={solver}", f"nfe={nfe}", "experiments=table2_digits"]}
    record.update(changes)
    return record


def write_cell(root: Path, name, solver, nfe, fid, rmse, **changes) -> Path:
    path = root / name / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(seal(cell_record(name, solver, nfe, fid, rmse, **changes)), indent=2))
    return path


def good_sweep(root: Path) -> Path:
    for c in GOOD:
        write_cell(root, *c)
    return root


def edit(path: Path, **changes) -> Path:
    """Change values of a sealed file without re-sealing it (what a hand edit does)."""
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record, indent=2))
    return path


def bad_files(root: Path) -> dict[str, Path]:
    """One metrics.json of each kind that must never be tabulated: {kind: path}."""
    out = {}
    out["edited or damaged"] = edit(write_cell(root, "edited", "ipndm", 7, 30.0, 0.15), fid=3.0)
    p = write_cell(root, "truncated", "heun", 7, 20.0, 0.1)
    p.write_text(p.read_text()[: len(p.read_text()) // 2])
    out["unreadable"] = p
    (root / "a_list").mkdir()
    (root / "a_list" / "metrics.json").write_text("[1, 2, 3]")
    out["not a JSON object"] = root / "a_list" / "metrics.json"
    (root / "foreign").mkdir()
    (root / "foreign" / "metrics.json").write_text(json.dumps({"complete": True, "label": "iPNDM", "solver": "ipndm",
                                                               "nfe": 7, "fid": 1.0, "rmse": 0.01}))
    out["not sealed"] = root / "foreign" / "metrics.json"
    out["incomplete"] = write_cell(root, "running", "heun", 9, 5.0, 0.05, complete=False)
    out["another format version"] = write_cell(root, "stale", "heun", 11, 4.0, 0.04, format=METRICS_FORMAT - 1)
    out["missing or mistyped fields"] = write_cell(root, "fid_string", "heun", 13, "12.5", 0.03)
    return out


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------
# the library: classify, the skipped files, conflicting cells
# ------------------------------------------------------------------------------------------------

def test_only_sealed_complete_cells_are_tabulated_and_one_warning_names_every_other_file(tmp_path, caplog):
    root = good_sweep(tmp_path / "sweep")
    bad = bad_files(root)
    (root / "binary").mkdir()
    (root / "binary" / "metrics.json").write_bytes(b"\xff\xfe\x00\x81 not text")
    bad["unreadable (binary)"] = root / "binary" / "metrics.json"
    missing_rmse = cell_record("no_rmse", "heun", 15, 2.0, 0.02)
    del missing_rmse["rmse"]
    (root / "no_rmse").mkdir()
    (root / "no_rmse" / "metrics.json").write_text(json.dumps(seal(missing_rmse)))
    bad["missing field"] = root / "no_rmse" / "metrics.json"

    cells, skipped = classify(root)
    assert sorted(Path(c["_path"]).parent.name for c in cells) == sorted(c[0] for c in GOOD)
    kinds = {Path(p): kind for p, kind, _ in skipped}
    assert set(kinds) == set(bad.values())
    expected = {"unreadable (binary)": "unreadable", "missing field": "missing or mistyped fields"}
    for kind, path in bad.items():
        assert kinds[path] == expected.get(kind, kind), (kind, path)
    assert set(kinds.values()) == set(SKIP_KINDS)
    reasons = {Path(p): r for p, _, r in skipped}
    assert "edited or damaged" in reasons[bad["edited or damaged"]]
    assert "fid='12.5'" in reasons[bad["missing or mistyped fields"]] and "no rmse" in reasons[bad["missing field"]]
    assert "format" in reasons[bad["another format version"]] and "running or killed" in reasons[bad["incomplete"]]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="amedlab"):
        result = write_tables(root, metrics=["fid", "rmse"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(warnings) == 1, warnings
    for path in bad.values():
        assert str(path) in warnings[0], path
    md = result["markdown"]
    assert "| NFE | 3 | 5 |" in md and "| 7 |" not in md            # no column from a skipped file
    assert "| iPNDM | **41.5** | **12.25** |" in md and "| DDIM (Euler) | 93.5 | 49.75 |" in md
    assert "EDM (Heun)" not in md and "| 3 |" not in md.replace("| NFE | 3 | 5 |", "")  # nor the edited FID (3.0)
    csv_files = [r["metrics_file"] for r in csv.DictReader(io.StringIO((root / "table2.csv").read_text()))]
    assert sorted(csv_files) == sorted(str(root / c[0] / "metrics.json") for c in GOOD)
    assert f"Skipped: {len(bad)} metrics.json file(s)" in md and "1 edited or damaged" in md and "2 unreadable" in md
    assert "1 incomplete" in md and "1 not sealed" in md and "2 missing or mistyped fields" in md
    assert (root / "table2.md").read_text() == md and "No intervals" in md
    assert len(result["skipped"]) == len(bad)


def test_a_sweep_without_a_good_cell_is_an_error_naming_sweep_dir_and_the_reasons(tmp_path):
    root = tmp_path / "sweep"
    bad = bad_files(root)
    with pytest.raises(ConfigError, match="sweep_dir") as info:
        write_tables(root)
    assert info.value.key == "sweep_dir"
    for path in bad.values():
        assert str(path.relative_to(root)) in str(info.value)
    assert "edited or damaged" in str(info.value) and "no digest" in str(info.value)
    assert _files_under(root) == sorted(str(p.relative_to(root)) for p in bad.values())  # nothing written
    with pytest.raises(ConfigError, match="sweep_dir"):
        CC.compare_rows(root, "ipndm", "heun")


@pytest.mark.parametrize("change", [
    {"solver_config": {"name": "ipndm", "afs": False, "final_step": "sigma_min", "options": {"max_order": 3}}},
    {"cell_key": "another-key"},
])
def test_one_label_and_nfe_for_two_configurations_is_an_error_naming_both_files(tmp_path, change):
    root = good_sweep(tmp_path / "sweep")
    other = write_cell(root, "copy_with_other_settings", "ipndm", 5, 8.0, 0.2, **change)
    first = root / "nfe=5,solver=ipndm" / "metrics.json"
    for call in (lambda: write_tables(root), lambda: CC.compare_rows(root, "ipndm", "euler")):
        with pytest.raises(ConfigError) as info:
            call()
        msg = str(info.value)
        assert info.value.key == "solver.label" and msg.startswith("solver.label='iPNDM'")
        assert str(first) in msg and str(other) in msg and "distinct solver.label" in msg and "NFE 5" in msg
        assert ("solver_config differs in options" in msg) == ("solver_config" in change)
    assert not (root / "table2.md").exists()


def test_the_same_cell_written_twice_keeps_the_newer_with_a_warning(tmp_path, caplog):
    root = good_sweep(tmp_path / "sweep")
    shutil.copytree(root / "nfe=5,solver=ipndm", root / "copied" / "nfe=5,solver=ipndm")
    with caplog.at_level(logging.WARNING, logger="amedlab"):
        nfes, rows = build_rows(classify(root)[0])
    assert rows["iPNDM"][5]["fid"] == 12.25 and nfes == [3, 5]
    assert any("same cell twice" in r.getMessage() and "NFE 5" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# the stages through the command line's task function
# ------------------------------------------------------------------------------------------------

def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust_inputs")
    f = {"dir": str(d), "good": str(good_sweep(d / "good"))}
    bad_files(d / "all_bad")
    f["all_bad"] = str(d / "all_bad")
    conflict = good_sweep(d / "conflict")
    write_cell(conflict, "rerun", "euler", 3, 80.0, 0.5, cell_key="other-settings")
    f["conflict"] = str(conflict)
    (d / "empty").mkdir()
    f["empty"] = str(d / "empty")
    (d / "a_file").write_text("x")
    f["a_file"] = str(d / "a_file")
    return f


BASE = {"table": ["stage=table", "sweep_dir={good}"],
        "compare_cells": ["stage=compare_cells", "sweep_dir={good}", "compare_cells.rows=[ipndm,euler]"]}

# (stage, overrides, the key the message names, other words it must hold)
CASES = [
    # -- stage=table --
    ("table", ["sweep_dir=null"], "sweep_dir", []),
    ("table", ["sweep_dir={dir}/missing"], "sweep_dir", ["no such directory"]),
    ("table", ["sweep_dir={a_file}"], "sweep_dir", ["is a file, not a directory"]),
    ("table", ["sweep_dir={empty}"], "sweep_dir", ["holds no complete metrics.json"]),
    ("table", ["sweep_dir={all_bad}"], "sweep_dir", ["edited/metrics.json", "truncated/metrics.json", "a_list/metrics.json",
                                                     "foreign/metrics.json", "running/metrics.json", "stale/metrics.json",
                                                     "fid_string/metrics.json"]),
    ("table", ["sweep_dir={conflict}"], "solver.label", ["conflict/rerun/metrics.json",
                                                         "conflict/nfe=3,solver=euler/metrics.json", "distinct solver.label"]),
    ("table", ["table.metrics=[is]"], "table.metrics", ["'is'", "fid, kid_mean, rmse"]),
    ("table", ["table.metrics=[]"], "table.metrics", ["non-empty list"]),
    ("table", ["table.metrics=fid"], "table.metrics", ["non-empty list"]),
    ("table", ["table.metrics=[fid,fid]"], "table.metrics", ["twice"]),
    ("table", ["table.significance.level=1.5"], "table.significance.level", ["1.5", "< 1"]),
    ("table", ["table.significance.level=abc"], "table.significance.level", ["'abc'"]),
    ("table", ["table.significance.source=bootstrap"], "table.significance.source", ["samples, total"]),
    ("table", ["+table.rowz=[a,b]"], "table.rowz", ["not a known key"]),
    ("table", ["+table.significance.levle=0.9"], "table.significance.levle", ["did you mean table.significance.level"]),
    ("table", ["table.out_dir={a_file}/out"], "table.out_dir", ["cannot write there"]),
    ("table", ["seed=-1"], "seed", []),
    ("table", ["logger=wandb", "logger.mode=sometimes"], "logger", []),
    # -- stage=compare_cells --
    ("compare_cells", ["compare_cells.rows=null"], "compare_cells.rows", ["two rows"]),
    ("compare_cells", ["compare_cells.rows=[ipndm]"], "compare_cells.rows", ["two rows"]),
    ("compare_cells", ["compare_cells.rows=[ipndm,euler,heun]"], "compare_cells.rows", ["two rows"]),
    ("compare_cells", ["compare_cells.rows=[ipndm,ipndm]"], "compare_cells.rows", ["same row"]),
    ("compare_cells", ["compare_cells.rows=[1,2]"], "compare_cells.rows", ["string"]),
    ("compare_cells", ["compare_cells.rows=[ipndm,heun]"], "compare_cells.rows", ["no row 'heun'", "'iPNDM'", "'DDIM (Euler)'"]),
    ("compare_cells", ["compare_cells.rows=[iPNDM,ipndm]"], "compare_cells.rows", ["both name the row 'iPNDM'"]),
    ("compare_cells", ["+compare_cells.rowz=[a,b]"], "compare_cells.rowz", ["did you mean compare_cells.rows"]),
    ("compare_cells", ["compare_cells.metrics=[fid,is]"], "compare_cells.metrics", ["'is'"]),
    ("compare_cells", ["compare_cells.metrics=[]"], "compare_cells.metrics", ["non-empty list"]),
    ("compare_cells", ["table.significance.level=0.2"], "table.significance.level", [">= 0.5"]),
    ("compare_cells", ["table.significance.source=seeds"], "table.significance.source", ["samples, total"]),
    ("compare_cells", ["compare_cells.out_dir={a_file}/out"], "compare_cells.out_dir", ["cannot write there"]),
    ("compare_cells", ["sweep_dir=null"], "sweep_dir", []),
    ("compare_cells", ["sweep_dir={dir}/missing"], "sweep_dir", ["no such directory"]),
    ("compare_cells", ["sweep_dir={a_file}"], "sweep_dir", ["is a file, not a directory"]),
    ("compare_cells", ["sweep_dir={all_bad}"], "sweep_dir", ["edited/metrics.json", "its content does not match its digest"]),
    ("compare_cells", ["sweep_dir={conflict}"], "solver.label", ["conflict/rerun/metrics.json", "distinct solver.label"]),
    ("compare_cells", ["seed=abc"], "seed", []),
]


def _overrides(stage, extra, inputs):
    return [o.format(**inputs) for o in BASE[stage] + list(extra)]


def test_compare_cells_has_its_check_and_both_base_configs_pass(inputs, tmp_path, monkeypatch):
    """The control: what the cases below change is the only thing wrong with them."""
    assert "compare_cells" in CHECKS and "table" in CHECKS
    monkeypatch.chdir(tmp_path)
    before = _files_under(Path(inputs["dir"]))
    for stage in BASE:
        check_stage(_compose(_overrides(stage, [], inputs)), stage)
    assert _files_under(tmp_path) == [] and _files_under(Path(inputs["dir"])) == before


def test_at_least_15_bad_inputs_across_both_stages():
    assert len(CASES) >= 15 and {c[0] for c in CASES} == {"table", "compare_cells"}
    assert len({(c[0], tuple(c[1])) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("stage,extra,key,words", CASES, ids=[f"{c[0]}: {' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_named_error_and_nothing_is_written(stage, extra, key, words, inputs, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    before = _files_under(Path(inputs["dir"]))
    cfg = _compose(_overrides(stage, extra, inputs))
    with pytest.raises(SystemExit) as exit_info:
        cli.hydra_main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert key in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert _files_under(tmp_path) == []                          # nothing written here
    assert _files_under(Path(inputs["dir"])) == before           # nor into the sweeps (no table, no probe left)


def test_table_stage_tabulates_the_rest_of_a_sweep_with_one_edited_file_and_names_it(tmp_path, capsys, caplog):
    root = good_sweep(tmp_path / "sweep")
    edited = edit(root / "nfe=5,solver=euler" / "metrics.json", fid=1.0)   # would be the best FID at NFE 5
    with caplog.at_level(logging.WARNING, logger="amedlab"):
        best = cli.hydra_main(_compose(["stage=table", f"sweep_dir={root}"]))
    assert best == 12.25                                         # the edited 1.0 is not the table's best FID
    out = capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and str(edited) in warnings[0] and "edited or damaged" in warnings[0]
    md = (root / "table2.md").read_text()
    assert "| DDIM (Euler) | 93.5 | n/a |" in md and "| iPNDM | **41.5** | **12.25** |" in md
    assert "Skipped: 1 metrics.json file(s)" in md and "1 edited or damaged" in md and "Skipped: 1" in out
    csv_text = (root / "table2.csv").read_text()
    assert str(edited) not in csv_text and str(root / "nfe=5,solver=ipndm" / "metrics.json") in csv_text


def test_compare_cells_stage_skips_an_edited_file_and_names_it(tmp_path, capsys, caplog):
    root = good_sweep(tmp_path / "sweep")
    edited = edit(root / "nfe=3,solver=euler" / "metrics.json", rmse=0.01)
    with caplog.at_level(logging.WARNING, logger="amedlab"):
        result = cli.hydra_main(_compose(["stage=compare_cells", f"sweep_dir={root}", "compare_cells.rows=[ipndm,euler]"]))
    assert result["nfes"] == [5] and [s["path"] for s in result["skipped"]] == [str(edited)]
    assert any(str(edited) in r.getMessage() for r in caplog.records)
    assert "Skipped: 1 metrics.json file(s)" in (root / "compare_ipndm_vs_ddim-euler.md").read_text()
    capsys.readouterr()
