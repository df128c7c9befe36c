"""Numbers you can trust: each class of silent, stale or unsafe result is impossible, not patched.

Bad inputs (one case per class and key): exit status 2, one ``error:`` line naming the key, no
traceback, no model call and nothing written, through the CLI's task function on the real ``conf/``
(the machinery of :mod:`test_reliability`). Faults: a finished cell is reused only while its numbers
are still right (sealed ``metrics.json``, a key over every input that changes a number, inputs by
content), and a full disk leaves nothing partial.
"""
from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from amedlab import cli
from amedlab.cache import seal, seal_problem
from amedlab.specs.config import cell_dirname
from amedlab.errors import DiskFullError
from amedlab.models.digits import save_denoiser
from amedlab.schedules import make_sigmas
from amedlab.stages import evaluate as evaluate_stage

from test_reliability import BASE, _compose, _files_under, _overrides, _tiny, files  # noqa: F401 (a fixture)

BIG = 10**12


@pytest.fixture(scope="module")
def data(files, tmp_path_factory):
    """Real-data files that do not fit the 8x8 one-channel digits model."""
    d = tmp_path_factory.mktemp("data")
    out = dict(files)
    np.save(d / "rgb.npy", np.zeros((6, 8, 8, 3), np.uint8))
    np.save(d / "big.npy", np.zeros((6, 16, 16, 1), np.uint8))
    np.savez(d / "mu3.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(d / "sigma_bad.npz", mu=np.zeros(64), sigma=np.eye(3))
    (d / "rgb_pngs").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "rgb_pngs" / f"{i}.png")
    (d / "mixed_pngs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "mixed_pngs" / "a.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "mixed_pngs" / "b.png")
    out.update({k: str(d / v) for k, v in {"rgb_npy": "rgb.npy", "big_npy": "big.npy", "mu3": "mu3.npz",
                                           "sigma_bad": "sigma_bad.npz", "rgb_pngs": "rgb_pngs",
                                           "mixed_pngs": "mixed_pngs"}.items()})
    return out


# (class, stage, overrides, the key the message must name)
CASES = [
    # -- seeds: distinct integers in [0, 2^32) --
    ("seeds", "evaluate", ["eval.seeds=[0,0,0,0]"], "eval.seeds"),
    ("seeds", "evaluate", ["eval.seeds='0-7,3'"], "eval.seeds"),
    ("seeds", "evaluate", ["eval.seeds=[0.5,1.5]"], "eval.seeds"),
    ("seeds", "evaluate", ["eval.seeds=[true,false]"], "eval.seeds"),
    ("seeds", "evaluate", ["eval.seeds=2.5"], "eval.seeds"),
    ("seeds", "evaluate", ["eval.seeds=4294967290-4294967299"], "eval.seeds"),
    ("seeds", "evaluate", ["eval.seeds=[4294967296]"], "eval.seeds"),
    ("seeds", "evaluate", ["eval.seeds=[-1,2]"], "eval.seeds"),
    ("seeds", "evaluate", ["seed=4294967296"], "seed"),
    ("seeds", "evaluate", ["seed=1.5"], "seed"),
    ("seeds", "evaluate", ["seed=true"], "seed"),
    ("seeds", "evaluate", ["eval.bootstrap.seed=4294967296"], "eval.bootstrap.seed"),
    ("seeds", "evaluate", ["solver=learned", "solver.distill.first_seed=4294967295"], "solver.distill.first_seed"),
    ("seeds", "evaluate", ["solver=learned", "solver.distill.first_seed=2.5"], "solver.distill.first_seed"),
    ("seeds", "compare", ["seed=-3"], "seed"),
    # -- sizes: every integer setting is bounded --
    ("sizes", "evaluate", ["nfe=1e12"], "nfe"),
    ("sizes", "evaluate", [f"nfe={BIG}"], "nfe"),
    ("sizes", "evaluate", ["nfe=5.0"], "nfe"),
    ("sizes", "evaluate", ["eval.seeds=0-9999999999"], "eval.seeds"),
    ("sizes", "evaluate", [f"eval.seeds={BIG}"], "eval.seeds"),
    ("sizes", "evaluate", ["eval.ode_reference.nfe=1000000"], "eval.ode_reference.nfe"),
    ("sizes", "evaluate", ["eval.bootstrap.resamples=1000000000"], "eval.bootstrap.resamples"),
    ("sizes", "evaluate", ["eval.bootstrap.resamples=1e9"], "eval.bootstrap.resamples"),
    ("sizes", "evaluate", ["eval.num_threads=100000"], "eval.num_threads"),
    ("sizes", "evaluate", [f"eval.batch_size={BIG}"], "eval.batch_size"),
    ("sizes", "evaluate", ["eval.kid_subsets=1000000000"], "eval.kid_subsets"),
    ("sizes", "evaluate", ["eval.sample_grid=100000"], "eval.sample_grid"),
    ("sizes", "evaluate", ["eval.ode_reference.chunk_size=1e12"], "eval.ode_reference.chunk_size"),
    ("sizes", "evaluate", ["solver=amed", f"distill.num_trajectories={BIG}"], "distill.num_trajectories"),
    ("sizes", "evaluate", ["solver=learned", f"solver.distill.num_trajectories={BIG}"], "solver.distill.num_trajectories"),
    ("sizes", "evaluate", ["solver=learned", "solver.distill.epochs=1e9"], "solver.distill.epochs"),
    ("sizes", "distill", ["distill.epochs=1000000000"], "distill.epochs"),
    ("sizes", "compare", [f"compare.num_samples={BIG}"], "compare.num_samples"),
    ("sizes", "compare", [f"compare.nfes=[3,{BIG}]"], "compare.nfes"),
    ("sizes", "analyze_trajectories", ["analysis.num_samples=100000000"], "analysis.num_samples"),
    ("sizes", "train_teacher", [f"train.teacher.steps={BIG}"], "train.teacher.steps"),
    ("sizes", "train_features", ["train.features.num_threads=100000"], "train.features.num_threads"),
    # -- eval.bootstrap: typed --
    ("values", "evaluate", ["eval.bootstrap=maybe"], "eval.bootstrap"),
    ("values", "evaluate", ["eval.bootstrap.kid_max_samples=-1"], "eval.bootstrap.kid_max_samples"),
    # -- grids: every grid built is finite and strictly decreasing --
    ("grids", "evaluate", ["schedule.rho=1e300"], "schedule"),
    ("grids", "evaluate", ["schedule.rho=1e-300"], "schedule"),
    ("grids", "evaluate", ["schedule.kind=time_uniform", "schedule.rho=1e300"], "schedule"),
    ("grids", "evaluate", ["eval.ode_reference.schedule.rho=1e300"], "eval.ode_reference.schedule"),
    ("grids", "evaluate", ["+eval.schedule_per_solver.euler={{kind: polynomial, rho: 1e300}}"], "eval.schedule_per_solver.euler"),
    ("grids", "evaluate", ["solver=learned", "solver.distill.starts=[{{rho: 1e300}}]"], "solver.distill.starts[0]"),
    ("grids", "distill", ["schedule.rho=1e300"], "schedule"),
    ("grids", "compare", ["schedule.rho=1e300"], "schedule"),
    ("grids", "evaluate", ["schedule.sigma_max=1e308"], "schedule.sigma_max"),
    ("grids", "evaluate", ["schedule.sigma_min=1e-320"], "schedule.sigma_min"),
    # -- a rule that needs training where nothing can train it --
    ("values", "evaluate", ["eval.ode_reference.solver.name=amed"], "eval.ode_reference.solver.name"),
    ("values", "evaluate", ["solver=amed", "solver.distill.teacher.name=learned"], "solver.distill.teacher.name"),
    ("values", "compare", ["compare.solvers=[amed]"], "compare.solvers[amed].name"),
    # -- data that fits together: checked before sampling --
    ("data", "evaluate", ["eval.real.source=path", "eval.feature_extractor=amedlab-digits", "eval.real.path={rgb_npy}"], "eval.real.path"),
    ("data", "evaluate", ["eval.real.source=path", "eval.feature_extractor=amedlab-digits", "eval.real.path={big_npy}"], "eval.real.path"),
    ("data", "evaluate", ["eval.real.source=path", "eval.feature_extractor=amedlab-digits", "eval.real.path={mu3}"], "eval.real.path"),
    ("data", "evaluate", ["eval.real.source=path", "eval.feature_extractor=amedlab-digits", "eval.real.path={sigma_bad}"], "eval.real.path"),
    ("data", "evaluate", ["eval.real.source=path", "eval.feature_extractor=amedlab-digits", "eval.real.path={rgb_pngs}"], "eval.real.path"),
    ("data", "evaluate", ["eval.real.source=path", "eval.feature_extractor=amedlab-digits", "eval.real.path={mixed_pngs}"], "eval.real.path"),
    ("data", "evaluate", ["dataset.image_size=16"], "dataset.image_size"),
    # -- writes stay where they belong --
    ("writes", "evaluate", ["ENV:AMEDLAB_CACHE="], "AMEDLAB_CACHE"),
    ("writes", "compare", ["ENV:AMEDLAB_CACHE= "], "AMEDLAB_CACHE"),
    ("writes", "distill", ["ENV:AMEDLAB_CACHE="], "AMEDLAB_CACHE"),
]


@pytest.mark.parametrize("klass,stage,extra,key", CASES, ids=[f"{c[0]}: {' '.join(c[2])}" for c in CASES])
def test_bad_value_is_one_named_error_before_anything(klass, stage, extra, key, data, tmp_path, monkeypatch, capsys,
                                                      model_calls):
    monkeypatch.chdir(tmp_path)
    for o in [o for o in extra if o.startswith("ENV:")]:
        name, value = o[4:].split("=", 1)
        monkeypatch.setenv(name, value)
    cfg = _compose(_overrides(stage, [o for o in extra if not o.startswith("ENV:")], data, tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        cli.hydra_main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert key in err, err
    assert "Traceback" not in err, err
    assert model_calls["n"] == 0
    assert _files_under(tmp_path) == []


def test_the_trust_cases_cover_every_class():
    assert len(CASES) >= 50
    assert {c[0] for c in CASES} == {"seeds", "sizes", "values", "grids", "data", "writes"}


# ------------------------------------------------------------------------------------------------
# the pieces
# ------------------------------------------------------------------------------------------------

def test_eval_bootstrap_false_means_off_and_true_the_defaults():
    from amedlab.evaluation.uncertainty import DEFAULTS, settings

    assert settings(False)["enabled"] is False
    assert settings(True) == DEFAULTS
    assert settings({"resamples": 50})["resamples"] == 50


def test_every_grid_made_is_finite_and_strictly_decreasing():
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_sigmas("polynomial", 4, 0.002, 80.0, 1e300)
    with pytest.raises(ValueError, match="cannot be computed"):
        make_sigmas("polynomial", 4, 0.002, 80.0, 1e-300)
    s = make_sigmas("polynomial", 18)
    assert bool((s[1:] < s[:-1]).all()) and float(s[-1]) == 0.002


def test_a_sealed_record_detects_any_edit():
    record = seal({"fid": 1.0 / 3, "nfe": 5, "sigmas": [80.0, 0.002], "nested": {"a": None}})
    back = json.loads(json.dumps(record, indent=2))
    assert seal_problem(back) is None
    for edit in ({"fid": 0.3}, {"nfe": 7}, {"extra": 1}, {"digest": "0" * 24}):
        assert seal_problem({**back, **edit}) is not None, edit
    assert "no digest" in seal_problem({k: v for k, v in back.items() if k != "digest"})
    assert seal_problem([1, 2]) is not None


@pytest.mark.parametrize("value", ["../../..", "a/b", "..", "/etc", "x" * 400, "a\\b"])
def test_a_cell_folder_is_one_component_whatever_the_swept_value(value, tmp_path):
    name = cell_dirname(f"eval.digits_classifier={value},nfe=5")
    assert "/" not in name and name not in (".", "..") and len(name.encode()) <= 200
    assert (tmp_path / "sweep" / name).resolve().parent == (tmp_path / "sweep").resolve()
    assert cell_dirname("nfe=5,solver=ipndm") == "nfe=5,solver=ipndm"  # the usual names are unchanged


# ------------------------------------------------------------------------------------------------
# a finished cell is one whose numbers are still right
# ------------------------------------------------------------------------------------------------

def _cell(tmp_path, *extra):
    model_path = tmp_path / "model.safetensors"
    return [o.format(run=tmp_path, tiny=model_path) for o in BASE["evaluate"]] + ["solver=euler", "nfe=3", *extra]


def _run(overrides, tmp_path):
    evaluate_stage.run(_compose(overrides))
    return json.loads((tmp_path / "metrics.json").read_text())


@pytest.fixture
def cell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_denoiser(_tiny(0), tmp_path / "model.safetensors")
    first = _run(_cell(tmp_path), tmp_path)
    return first


def test_a_finished_cell_is_skipped_only_while_sealed_and_complete(cell, tmp_path, model_calls, caplog):
    path = tmp_path / "metrics.json"
    assert seal_problem(json.loads(path.read_text())) is None
    again = _run(_cell(tmp_path), tmp_path)
    assert model_calls["n"] == 0 and again == cell          # the control: a verified cell is reused
    # edited: the FID changed by hand is recomputed back to the true value
    path.write_text(json.dumps({**cell, "fid": 1.0}, indent=2))
    fixed = _run(_cell(tmp_path), tmp_path)
    assert model_calls["n"] > 0 and fixed["fid"] == cell["fid"] and "edited or damaged" in caplog.text
    # damaged (truncated) and incomplete: recomputed too
    for broken in (path.read_text()[:100], json.dumps(seal({**{k: v for k, v in cell.items() if k != "digest"},
                                                           "complete": False}))):
        path.write_text(broken)
        calls = model_calls["n"]
        assert _run(_cell(tmp_path), tmp_path)["fid"] == cell["fid"] and model_calls["n"] > calls


def test_a_model_replaced_with_cp_p_is_recomputed(cell, tmp_path):
    """Same path, size and mtime (``cp -p``): the digest memo must not trust them."""
    model = tmp_path / "model.safetensors"
    other = save_denoiser(_tiny(1), tmp_path / "other.safetensors")
    st = model.stat()
    assert other.stat().st_size == st.st_size
    shutil.copy2(other, model)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model.stat().st_mtime_ns == st.st_mtime_ns and model.stat().st_size == st.st_size
    replaced = _run(_cell(tmp_path), tmp_path)
    assert replaced["fid"] != cell["fid"] and replaced["cell_key"] != cell["cell_key"]
    # and it is the other model's true number
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(other, fresh / "model.safetensors")
    os.chdir(fresh)
    assert _run(_cell(fresh), fresh)["fid"] == replaced["fid"]


def test_seed_is_in_the_cell_key(cell, tmp_path):
    other = _run(_cell(tmp_path, "seed=1"), tmp_path)
    assert other["cell_key"] != cell["cell_key"] and other["kid_mean"] != cell["kid_mean"]


def test_an_output_asked_for_on_a_finished_cell_is_produced(cell, tmp_path):
    assert not (tmp_path / "samples.npz").exists()
    again = _run(_cell(tmp_path, "eval.save_samples=true"), tmp_path)
    with np.load(tmp_path / "samples.npz") as z:
        assert z["images"].shape == (8, 1, 8, 8) and list(z["seeds"]) == list(range(8))
    assert again["fid"] == cell["fid"]


def test_metrics_record_the_shapes_and_what_decides_the_bits(cell):
    assert cell["sample_shape"] == [1, 8, 8] and cell["real_shape"] == [1, 8, 8]
    env = cell["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["dtype"] == "torch.float32" and env["cpu_capability"] and env["device"] == "cpu"


def test_a_full_disk_is_one_named_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_denoiser(_tiny(0), tmp_path / "model.safetensors")
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("metrics.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SystemExit) as exit_info:
        cli.hydra_main(_compose(_cell(tmp_path)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left") and "\n" not in err and "metrics.json" in err
    assert not (tmp_path / "metrics.json").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]               # no partial file
    with pytest.raises(DiskFullError):
        from amedlab.io import atomic_write_json

        atomic_write_json(tmp_path / "x" / "metrics.json", {"a": 1})
    assert list((tmp_path / "x").iterdir()) == []
