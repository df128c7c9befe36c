"""Trained results you can trust: a cached predictor or learned solver is used only for the settings
it was trained for (not only for its bytes), a damaged JSON sidecar is rebuilt from the blob without
retraining, and a training that diverges is one named error with nothing cached."""
from __future__ import annotations

import importlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab import cli
from amedlab.amed import AMEDPredictor
from amedlab.specs import CONF_DIR
from amedlab.errors import ResultError
from amedlab.amed.distill import cell_predictor
from amedlab.learned import LearnedSolverParams
from amedlab.learned.train import cell_learned
from amedlab.models.analytic import default_mixture
from amedlab.models.digits import make_digits_denoiser, save_denoiser
from amedlab.io import plain
from amedlab.specs import DistillSpec, cell_settings

distill_module = importlib.import_module("amedlab.amed.distill")
learned_train = importlib.import_module("amedlab.learned.train")

POLY = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
TIME_UNIFORM = {"kind": "time_uniform", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 1.0}
TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


@pytest.fixture(scope="module")
def mixture():
    return default_mixture().float()


def _spec(tmp_path, **fields) -> DistillSpec:
    base = dict(solver="amed", nfe=3, schedule=POLY, num_trajectories=32, batch_size=16, epochs=1, seed=0,
                cache_dir=tmp_path / "trajectories")
    return DistillSpec.create(**{**base, **fields})


def _predictor_path(tmp_path, spec: DistillSpec, model) -> Path:
    return tmp_path / "predictors" / f"{spec.solver}-nfe{int(spec.nfe)}-{spec.key(model.identity())}.pt"


def _cached_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if folder.exists() else []


def _no_training(*args, **kwargs):
    raise AssertionError("trained again, but the cached result should have been used")


# ------------------------------------------------------------------------------------------------
# (a) a cached result is used only for the settings it was trained for
# ------------------------------------------------------------------------------------------------

def test_a_predictor_copied_to_another_settings_key_is_retrained_with_a_warning(mixture, tmp_path, caplog):
    two = _spec(tmp_path, epochs=2)
    trained, info = cell_predictor(mixture, two, tmp_path, True)
    assert info["source"] == "distilled"
    one = _spec(tmp_path, epochs=1)
    target = _predictor_path(tmp_path, one, mixture)
    assert Path(info["path"]) != target
    shutil.copy(info["path"], target)                                   # verified bytes, the wrong settings
    shutil.copy(Path(info["path"]).with_suffix(".json"), target.with_suffix(".json"))
    with caplog.at_level(logging.WARNING, logger="amedlab.cache"):
        retrained, info1 = cell_predictor(mixture, one, tmp_path, True)
    assert info1["source"] == "distilled" and info1["path"] == str(target)
    warning = _warnings_naming(caplog, target)
    assert warning and "epochs=2" in warning[0] and "1 expected" in warning[0], warning
    assert retrained.meta["epochs"] == 1 and trained.meta["epochs"] == 2
    # the retrained file is now the cache for its own settings
    _, again = cell_predictor(mixture, one, tmp_path, True)
    assert again["source"] == "cache"
    # a predictor file without settings (stage=distill's predictor.pt): loadable as the user's own
    # solver.predictor, never accepted from the cache
    user_file = trained.save(tmp_path / "predictor.pt")
    assert AMEDPredictor.load(user_file).meta["epochs"] == 2
    plain = retrained.save(tmp_path / "plain.pt")
    shutil.copy(plain, target)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="amedlab.cache"):
        _, info2 = cell_predictor(mixture, one, tmp_path, True)
    assert info2["source"] == "distilled"
    assert any("records no settings" in r.getMessage() and str(target) in r.getMessage() for r in caplog.records)



def _warnings_naming(caplog, path) -> list[str]:
    """The warnings logged about the cache file ``path``."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]

def _cell_learned(model, cfg, settings, cache_dir):
    """``cell_learned`` on a composed config's cell (as ``stage=evaluate`` calls it)."""
    return cell_learned(model, settings, plain(cfg.eval.ode_reference), int(cfg.eval.batch_size), cfg.model.name,
                        cache_dir)


def _learned_cfg(compose_cfg, tmp_path, *extra):
    return compose_cfg("stage=evaluate", "model=gaussian_mixture", "solver=learned", "nfe=3", "eval.seeds=0-15",
                       "eval.batch_size=64", f"cache_dir={tmp_path}", "eval.dtype=float64", "eval.ode_reference.nfe=12",
                       "solver.distill.num_trajectories=16", "solver.distill.batch_size=8", "solver.distill.epochs=1",
                       "solver.distill.starts=[{}]", *extra)


def _learned(compose_cfg, tmp_path, *extra):
    cfg = _learned_cfg(compose_cfg, tmp_path, *extra)
    return cfg, cell_settings(cfg, dict(cfg.solver), dict(cfg.schedule), range(16))


def test_a_learned_solver_copied_to_another_settings_key_is_retrained_with_a_warning(compose_cfg, tmp_path, caplog):
    model = default_mixture()
    cfg2, two = _learned(compose_cfg, tmp_path, "solver.distill.lr=0.05")
    params, info = _cell_learned(model, cfg2, two, tmp_path)
    assert info["source"] == "trained"
    cfg1, one = _learned(compose_cfg, tmp_path)
    probe, probe_info = _cell_learned(model, cfg1, one, tmp_path)              # where the default's file lives
    target = Path(probe_info["path"])
    shutil.copy(info["path"], target)
    with caplog.at_level(logging.WARNING, logger="amedlab.cache"):
        again, info1 = _cell_learned(model, cfg1, one, tmp_path)
    assert info1["source"] == "trained" and info1["path"] == str(target)
    warning = _warnings_naming(caplog, target)
    assert warning and "lr=0.05" in warning[0] and "0.02 expected" in warning[0], warning
    assert again.meta["lr"] == 0.02 and params.meta["lr"] == 0.05
    # the file itself stays a learned solver's parameters (make_solver("learned", params=<path>))
    assert LearnedSolverParams.load(target).meta["lr"] == 0.02


# ------------------------------------------------------------------------------------------------
# (b) a damaged sidecar is rebuilt from the blob; the cached result is still used
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["{", "[1, 2]", b"\xff\xfe"], ids=["truncated", "not-an-object", "not-utf8"])
def test_a_damaged_predictor_sidecar_is_rebuilt_without_retraining(damage, mixture, tmp_path, caplog, monkeypatch):
    spec = _spec(tmp_path)
    _, info = cell_predictor(mixture, spec, tmp_path, True)
    sidecar = Path(info["path"]).with_suffix(".json")
    written = json.loads(sidecar.read_text())
    (sidecar.write_bytes if isinstance(damage, bytes) else sidecar.write_text)(damage)
    monkeypatch.setattr(distill_module, "distill", _no_training)
    with caplog.at_level(logging.WARNING, logger="amedlab.cache"):
        predictor, cached = cell_predictor(mixture, spec, tmp_path, True)
    assert cached["source"] == "cache" and cached["records"] == written["records"]
    assert any(str(sidecar) in r.getMessage() and "rewritten" in r.getMessage() for r in caplog.records)
    rebuilt = json.loads(sidecar.read_text())
    assert rebuilt["records"] == written["records"] and rebuilt["meta"] == written["meta"]
    assert rebuilt["settings"]["epochs"] == 1 and rebuilt["settings"]["model_identity"] == mixture.identity()
    sidecar.unlink()                                                   # a missing one is written again too
    assert cell_predictor(mixture, spec, tmp_path, True)[1]["source"] == "cache" and sidecar.is_file()


def test_a_damaged_learned_sidecar_is_rebuilt_without_retraining(compose_cfg, tmp_path, caplog, monkeypatch):
    model = default_mixture()
    cfg, settings = _learned(compose_cfg, tmp_path)
    _, info = _cell_learned(model, cfg, settings, tmp_path)
    sidecar = Path(info["path"]).with_suffix(".json")
    records = json.loads(sidecar.read_text())["records"]
    sidecar.write_text("{")
    monkeypatch.setattr(learned_train, "train_learned", _no_training)
    with caplog.at_level(logging.WARNING, logger="amedlab.cache"):
        _, cached = _cell_learned(model, cfg, settings, tmp_path)
    assert cached["source"] == "cache" and cached["records"] == records
    assert any(str(sidecar) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert json.loads(sidecar.read_text())["records"] == records


# ------------------------------------------------------------------------------------------------
# (c) a training that diverges is a named error and nothing is cached
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,key", [
    (dict(lr=1e30), "distill.lr"),
    (dict(schedule=TIME_UNIFORM, objective="trajectory", learn_grid=True, grid_lr=1e30), "solver.distill.grid_lr"),
    (dict(schedule=TIME_UNIFORM, objective="trajectory", learn_grid=True, lr=1e30), "distill.lr"),
], ids=["lr", "grid_lr", "lr-with-learn_grid"])
def test_a_diverging_distillation_is_a_named_error_and_nothing_is_cached(fields, key, mixture, tmp_path):
    spec = _spec(tmp_path, epochs=3, **fields)
    with pytest.raises(ResultError, match="training diverged at update") as err:
        cell_predictor(mixture, spec, tmp_path, True)
    assert err.value.key == key and f"{key}=1e+30" in str(err.value) and f"lower {key}" in str(err.value)
    assert "nothing was cached" in str(err.value) and "\n" not in str(err.value)
    assert _cached_files(tmp_path / "predictors") == []


def test_a_diverging_distillation_stops_at_the_first_bad_update(mixture, tmp_path, monkeypatch):
    records = []
    real_record = distill_module.AMEDDistillation._record

    def record(self, fit, i, loss):
        records.append(loss)
        return real_record(self, fit, i, loss)

    monkeypatch.setattr(distill_module.AMEDDistillation, "_record", record)
    with pytest.raises(ResultError, match=r"at update \d+ ") as err:
        distill_module.distill(mixture, _spec(tmp_path, lr=1e30, epochs=5))
    update = int(str(err.value).split("at update ")[1].split(" ")[0])
    assert update <= 2 and len(records) == update - 1    # stopped there, 5 epochs x 2 batches x 2 intervals not run


def _nan_from_call(real, n: int, calls: list):
    """``real`` (a loss function returning (loss, ...)) whose loss is NaN from its ``n``-th call on."""
    def patched(*args, **kwargs):
        calls.append(1)
        loss, *rest = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) >= n else loss, *rest)
    return patched


def test_a_non_finite_loss_stops_the_distillation_at_that_update(mixture, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(distill_module, "trajectory_loss", _nan_from_call(distill_module.trajectory_loss, 3, calls))
    with pytest.raises(ResultError, match=r"distill\.lr=0\.005: training diverged at update 3 \(loss nan\)") as err:
        cell_predictor(mixture, _spec(tmp_path, objective="trajectory", epochs=4), tmp_path, True)
    assert err.value.key == "distill.lr" and len(calls) == 3                  # not the 8 updates of 4 epochs
    assert _cached_files(tmp_path / "predictors") == []


def test_a_non_finite_loss_stops_the_learned_solver_at_that_update(compose_cfg, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(learned_train, "trajectory_loss", _nan_from_call(learned_train.trajectory_loss, 2, calls))
    cfg, settings = _learned(compose_cfg, tmp_path, "solver.distill.epochs=3")
    with pytest.raises(ResultError, match=r"solver\.distill\.lr=0\.02: training diverged at update 2 \(loss nan\)"):
        _cell_learned(default_mixture(), cfg, settings, tmp_path)
    assert len(calls) == 2 and _cached_files(tmp_path / "learned") == []


@pytest.mark.parametrize("extra", [
    ["solver.distill.lr=1e30"],
    ["solver.distill.lr=1e30", "solver.distill.learn_coefficients=false"],
    ["solver.distill.lr=1e30", "solver.distill.learn_grid=false"],
], ids=["grid-and-coefficients", "grid-only", "coefficients-only"])
def test_a_diverging_learned_solver_is_a_named_error_and_nothing_is_cached(extra, compose_cfg, tmp_path):
    cfg, settings = _learned(compose_cfg, tmp_path, *extra)
    with pytest.raises(ResultError, match="training diverged at update") as err:
        _cell_learned(default_mixture(), cfg, settings, tmp_path)
    assert err.value.key == "solver.distill.lr" and "solver.distill.lr=1e+30" in str(err.value)
    assert "lower solver.distill.lr" in str(err.value)
    assert _cached_files(tmp_path / "learned") == []


def test_a_diverging_distillation_through_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = make_digits_denoiser(TINY_NET, sigma_data=0.75).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_path = save_denoiser(model, tmp_path / "tiny.safetensors")
    overrides = ["stage=evaluate", "model=digits_unet", f"model.path={model_path}", "eval.seeds=0-7", "eval.batch_size=8",
                 "eval.kid_subsets=2", "eval.ode_reference.nfe=6", f"cache_dir={tmp_path}/cache",
                 "distill.num_trajectories=16", "distill.batch_size=8",
                 "solver=amed", "nfe=3", "distill.lr=1e30"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(SystemExit) as exit_info:
        cli.hydra_main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "distill.lr" in err and "Traceback" not in err, err
    assert not list(tmp_path.rglob("metrics.json"))
    assert _cached_files(tmp_path / "cache" / "predictors") == []
