"""A third trained method is one module and one YAML: a toy package written to tmp_path (Euler whose
step over each interval is scaled by one learned scalar, trained with the shared fit against the
high-NFE reference) and ``conf/solver/scaled_euler.yaml`` in a config folder of its own. The YAML's
``_target_`` imports the package; its rule carries a ``trained`` hook; ``stage=evaluate`` runs it
through the same path as AMED and the learned solver (no name of it anywhere in amedlab), trains it
once, records its settings in the cell key and its part in metrics.json, and takes it from the cache
the second time."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab import solvers
from amedlab.models.digits import make_digits_denoiser, save_denoiser
from amedlab.specs import CONF_DIR

TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])

PACKAGE = '''
"""Euler with one learned step scale per interval: x_next = x + (1 + s_i) (t_next - t_i) d(x_i, t_i)."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from amedlab.cache import read_tensors, save_verified, verified
from amedlab.data.reference import ode_reference
from amedlab.errors import ConfigError
from amedlab.sampling import seeded_noise
from amedlab.solvers import Solver, StepRule, bcast, register_solver
from amedlab.training.loss import divergence, squared_error


class Scales(nn.Module):
    """The trained part: s_i per interval (0: plain Euler); saves itself as a verified blob."""

    def __init__(self, num_intervals, meta=None):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(num_intervals, dtype=torch.float64))
        self.meta = dict(meta or {})

    def save(self, path, spec=None, records=None):
        blob = {"kind": "scaled_euler", "s": self.s.detach().cpu(), "meta": self.meta}
        return save_verified(path, {**blob, **({"spec": spec} if spec is not None else {}),
                                    **({"records": records} if records is not None else {})})

    @classmethod
    def from_blob(cls, blob, path):
        if blob.get("kind") != "scaled_euler" or not verified(blob):
            raise ValueError(f"{path}: not a scaled-Euler file")
        part = cls(len(blob["s"]), blob["meta"])
        part.s.data.copy_(blob["s"])
        return part


class ScaledEuler(StepRule):
    name = "scaled_euler"

    def __init__(self, scales=None):
        self.scales, self._step = scales, 0

    def prepare(self, denoiser, sigmas, afs):
        self._step = 0

    def step(self, denoiser, cur, t_next, history, remaining):
        i, self._step = self._step, self._step + 1
        scale = 1.0 if self.scales is None else 1.0 + self.scales.s[i].to(cur.x.dtype)
        return cur.x + scale * bcast(t_next - cur.t, cur.x) * cur.slope, [cur]


class ScaleFit:
    """The shared fit's TrainedMethod: the final sample against the reference, one update per batch."""

    def __init__(self, denoiser, scales, sigmas, lr):
        self.denoiser, self.scales, self.sigmas, self.lr = denoiser, scales, sigmas, lr

    def parameters_module(self):
        return self.scales

    def optimizer_groups(self):
        return [{"params": [self.scales.s], "lr": self.lr}]

    def updates(self, batch, fit):
        from amedlab.training.fit import Update

        noise, target = batch
        x = Solver(ScaledEuler(self.scales)).sample(self.denoiser, noise, self.sigmas.to(noise.device))
        yield Update(squared_error(x, target), len(noise))

    def check(self, loss):
        return divergence(loss, {"scale": self.scales}), "solver.distill.lr", self.lr


class ScaleCell:
    """The shared cache's CachedTraining: <cache_dir>/scaled_euler/scaled_euler-nfe<N>-<key>.pt."""

    what, folder = "cached scaled Euler", "scaled_euler"

    def __init__(self, model, settings, cell):
        self.model, self.cell_settings, self.cell = model, settings, cell

    def stem(self):
        return f"scaled_euler-nfe{self.cell_settings['nfe']}"

    def settings(self):
        return {"model_identity": self.model.identity(), **self.cell_settings}

    def load(self, blob, path):
        return Scales.from_blob(blob, path)

    def train(self):
        from amedlab.schedules import ScheduleSpec
        from amedlab.training.fit import fit

        s, cell = self.cell_settings, self.cell
        seeds = list(range(s["first_seed"], s["first_seed"] + s["num_trajectories"]))
        smin, smax = float(cell.schedule["sigma_min"]), float(cell.schedule["sigma_max"])
        target, _ = ode_reference(self.model, cell.ode_reference, smin, smax, seeds, cell.cache_dir, cell.batch_size)
        noise = seeded_noise(seeds, tuple(self.model.sample_shape), smax)
        sigmas = ScheduleSpec.from_cfg(cell.schedule).grid(cell.num_points)
        torch.manual_seed(s["seed"])
        scales = Scales(cell.num_points - 1)
        loader = DataLoader(TensorDataset(noise, target.cpu()), batch_size=s["batch_size"], drop_last=True)
        done = fit(ScaleFit(self.model, scales, sigmas, s["lr"]), self.model, loader, epochs=s["epochs"])
        scales = scales.cpu()
        scales.meta = {"scales": [1.0 + v for v in scales.s.tolist()], "updates": done.updates,
                       "loss_first": done.records[0]["loss"], "loss_end": done.records[-1]["loss"]}
        return scales, {"settings": s, "meta": scales.meta, "records": done.records}


class ScaledTraining:
    """The rule's trained hook: what stage=evaluate asks of it."""

    key = "scaled_euler"   # the cell key's entry; the logger's prefix
    KEYS = ("num_trajectories", "first_seed", "batch_size", "epochs", "lr")

    def cell_settings(self, cell):
        sdist = dict(cell.solver.get("distill") or {})
        unknown = sorted(set(sdist) - set(self.KEYS))
        if unknown:
            raise ConfigError(f"solver.distill has unknown keys {unknown}; accepted: {', '.join(self.KEYS)}",
                              "solver.distill")
        train = range(sdist["first_seed"], sdist["first_seed"] + sdist["num_trajectories"])
        if any(seed in train for seed in cell.eval_seeds):
            raise ConfigError(f"solver.distill.first_seed={sdist['first_seed']}: the training seeds overlap "
                              "eval.seeds; accepted: a range disjoint from eval.seeds", "solver.distill.first_seed")
        return {**sdist, "nfe": cell.nfe, "schedule": dict(cell.schedule), "seed": cell.seed,
                "teacher": {k: v for k, v in cell.ode_reference.items() if k != "chunk_size"}}

    def prepare(self, model, settings, cell, use_cache):
        from amedlab.training.fit import train_cached

        return train_cached(ScaleCell(model, settings, cell), cell.cache_dir, use_cache)

    def build_kwargs(self, part, device):
        return {"scales": part.to(device)}


ScaledEuler.trained = ScaledTraining()
register_solver("scaled_euler", ScaledEuler)
'''

YAML = '''# Euler with one learned step scale per interval (the toy_scaled package)
name: scaled_euler
_target_: toy_scaled.ScaledEuler
label: Scaled Euler (toy)
afs: false
final_step: sigma_min
options: {}
distill:
  num_trajectories: 16
  first_seed: 300000
  batch_size: 8
  epochs: 2
  lr: 0.05
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The package on the Python path, the YAML in a config folder; registrations undone afterwards."""
    package = tmp_path / "pkg" / "toy_scaled"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PACKAGE)
    conf = tmp_path / "myconf" / "solver"
    conf.mkdir(parents=True)
    (conf / "scaled_euler.yaml").write_text(YAML)
    monkeypatch.setattr(solvers, "_RULES", dict(solvers._RULES))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.delitem(sys.modules, "toy_scaled", raising=False)
    torch.manual_seed(0)
    model = make_digits_denoiser(TINY_NET, sigma_data=0.75).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    yield {"conf": tmp_path / "myconf", "model": save_denoiser(model, tmp_path / "tiny.safetensors"), "run": run,
           "cache": tmp_path / "cache"}
    sys.modules.pop("toy_scaled", None)


def _compose(toy, *extra):
    overrides = [f"hydra.searchpath=[file://{toy['conf']}]", "stage=evaluate", "model=digits_unet",
                 f"model.path={toy['model']}", "solver=scaled_euler", "nfe=3", "eval.seeds=0-7", "eval.batch_size=8",
                 "eval.kid_subsets=2", "eval.ode_reference.nfe=6", f"cache_dir={toy['cache']}",
                 "eval.skip_finished=false", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_a_third_trained_method_is_one_module_and_one_yaml(toy):
    from amedlab.evaluation.evaluate import cell_spec, input_files
    from amedlab.specs import check_stage
    from amedlab.stages import evaluate as evaluate_stage

    cfg = _compose(toy)
    spec = check_stage(cfg, "evaluate")  # the YAML's _target_ imported the package: its hook is asked
    assert spec.trained is sys.modules["toy_scaled"].ScaledEuler.trained and spec.trained.key == "scaled_euler"
    assert spec.trained_settings == {"num_trajectories": 16, "first_seed": 300000, "batch_size": 8, "epochs": 2,
                                     "lr": 0.05, "nfe": 3, "schedule": spec.schedule, "seed": 0,
                                     "teacher": {k: v for k, v in spec.ode_reference.items() if k != "chunk_size"}}
    key_content = cell_spec(spec, input_files(spec))
    assert key_content["scaled_euler"] == spec.trained_settings and "distill" not in key_content

    evaluate_stage.run(cfg)
    first = json.loads((toy["run"] / "metrics.json").read_text())
    assert first["complete"] and math.isfinite(first["fid"]) and math.isfinite(first["rmse"])
    assert first["label"] == "Scaled Euler (toy)" and first["nfe_counted"] == 3
    trained = first["predictor"]
    assert trained["source"] == "trained" and Path(trained["path"]).parent == toy["cache"] / "scaled_euler"
    sidecar = json.loads(Path(trained["path"]).with_suffix(".json").read_text())
    assert sidecar["settings"] == spec.trained_settings and sidecar["meta"]["updates"] == 2 * 2  # batches x epochs
    scales = sidecar["meta"]["scales"]
    assert len(scales) == 3 and all(math.isfinite(s) for s in scales) and any(abs(s - 1.0) > 1e-6 for s in scales)
    assert [r["loss"] for r in sidecar["records"]] and all(math.isfinite(r["loss"]) for r in sidecar["records"])

    evaluate_stage.run(cfg)  # the same cell again (not skipped): the trained part comes from the cache
    second = json.loads((toy["run"] / "metrics.json").read_text())
    assert second["predictor"]["source"] == "cache" and second["predictor"]["path"] == trained["path"]
    assert second["fid"] == first["fid"] and second["rmse"] == first["rmse"] and second["cell_key"] == first["cell_key"]

    # another setting is another cell and another trained part
    other = check_stage(_compose(toy, "solver.distill.lr=0.01"), "evaluate")
    assert cell_spec(other, input_files(other))["scaled_euler"]["lr"] == 0.01


def test_the_toy_hook_checks_its_settings_before_any_compute(toy, model_calls):
    from amedlab.errors import ConfigError
    from amedlab.specs import check_stage

    with pytest.raises(ConfigError, match=r"solver\.distill\.first_seed=0: the training seeds overlap") as err:
        check_stage(_compose(toy, "solver.distill.first_seed=0"), "evaluate")
    assert err.value.key == "solver.distill.first_seed" and model_calls["n"] == 0
    assert not toy["cache"].exists() or not list(toy["cache"].rglob("*.pt"))
