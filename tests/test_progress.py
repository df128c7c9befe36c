"""Progress bars (amedlab.progress): on a terminal only, forced by AMEDLAB_PROGRESS, never changing a
result or a random stream; Lightning's bar follows the same policy; torchmetrics aggregates the
logged epoch / validation metrics."""
import io
import multiprocessing
import random
import re

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from amedlab.amed.distill import distill
from amedlab.data.reference import ode_reference
from amedlab.data.trajectories import cached_trajectories
from amedlab.evaluation.uncertainty import cell_bootstrap
from amedlab.models.analytic import default_mixture
from amedlab.models.digits import make_digits_denoiser
from amedlab.progress import ENV, enabled, progress
from amedlab.sampling import generate, parse_seeds
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver
from amedlab.training import fit as fit_module
from amedlab.training.features import ClassifierModule
from amedlab.models.precond import edm_loss
from amedlab.training.teacher import VAL_SEED, TeacherModule, make_trainer

TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
POLY = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
BAR = re.compile(r"(\d+)/(\d+) \[\d\d:\d\d<\d\d:\d\d")  # tqdm's "done/total [elapsed<remaining"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def tiny_denoiser():
    torch.manual_seed(0)
    return make_digits_denoiser(TINY_NET, sigma_data=0.75).eval().requires_grad_(False)


def _rng_states():
    return torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_rng(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# --- the policy ---------------------------------------------------------------------------------

def test_silent_off_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    assert not enabled()  # pytest's captured stderr is no terminal
    items = range(5)
    assert progress(items, total=5, desc="x") is items  # the iterable itself, unwrapped
    with progress(total=5, desc="x") as bar:
        bar.update(3)
        bar.set_postfix_str("loss 1")
    assert capsys.readouterr().err == ""


def test_terminal_main_process_rank_zero_only(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert enabled()
    assert not enabled(io.StringIO())  # the stream a bar writes to is the one asked about (Lightning: stdout)
    monkeypatch.setenv(ENV, "0")
    assert not enabled()  # forced off on a terminal
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("RANK", "1")
    assert not enabled()  # another rank of torchrun
    monkeypatch.delenv("RANK")
    # a joblib / multiprocessing worker inherits the terminal: parallel cells would garble each other's bars
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    assert not enabled()
    monkeypatch.setenv(ENV, "1")
    assert enabled() and enabled(io.StringIO())  # forced on anywhere


def test_forced_on_shows_one_bar_with_total_and_eta(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    assert list(progress(range(4), total=4, desc="ODE reference heun 40 NFE", unit="img")) == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "ODE reference heun 40 NFE" in err and "img" in err
    assert ("4", "4") in BAR.findall(err)
    with progress(total=10, desc="by hand", unit="img") as bar:
        bar.update(4)
        bar.update(6)
    err = capsys.readouterr().err
    assert "by hand" in err and ("10", "10") in BAR.findall(err)
    assert err.count("\n") <= 1  # one line: updated in place (carriage returns)


# --- bars change no result and no random stream -------------------------------------------------

def test_sampling_is_the_same_with_and_without_bars(tiny_denoiser, monkeypatch, capsys):
    solver = make_solver("ipndm")
    sigmas = make_sigmas("polynomial", solver.num_points(5))
    seeds = parse_seeds("0-11")
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(ENV, flag)
        torch.manual_seed(123)
        before = _rng_states()
        out[flag] = generate(tiny_denoiser, solver, sigmas, seeds, batch_size=5, progress="ipndm NFE 5")
        out[flag + "rng"] = _rng_states()
        assert _same_rng(before, out[flag + "rng"])  # per-seed generators only: the global stream untouched
        out[flag + "err"] = capsys.readouterr().err
    assert torch.equal(out["1"][0], out["0"][0]) and out["1"][1] == out["0"][1] == 5
    assert "sampling ipndm NFE 5" in out["1err"] and ("12", "12") in BAR.findall(out["1err"])
    assert out["0err"] == ""


def test_reference_trajectories_and_bootstrap_are_the_same_with_and_without_bars(monkeypatch, capsys, tmp_path):
    model = default_mixture().float()
    ref = {"solver": {"name": "heun", "afs": False, "options": {}}, "nfe": 10, "schedule": {"kind": "polynomial", "rho": 7.0},
           "chunk_size": 10}
    teacher = {"name": "heun", "afs": False, "options": {}}
    g = torch.Generator().manual_seed(0)
    gen_f, real_f = torch.randn(60, 4, generator=g), torch.randn(50, 4, generator=g) + 0.3
    boot = {"resamples": 40, "seed": 0}
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(ENV, flag)
        reference, _ = ode_reference(model, ref, 0.002, 80.0, range(25), tmp_path / flag, batch_size=4)
        cached, info = ode_reference(model, ref, 0.002, 80.0, range(25), tmp_path / flag, batch_size=4)
        assert info["cached"] and torch.equal(cached, reference)
        traj, _ = cached_trajectories(model, teacher, POLY, 4, 2, range(24), None, batch_size=10)
        summary, arrays = cell_bootstrap(gen_f, None, None, real_f, boot)
        got[flag] = (reference, traj, arrays, summary, capsys.readouterr().err)
    on, off = got["1"], got["0"]
    assert torch.equal(on[0], off[0])
    assert torch.equal(on[1]["states"], off[1]["states"]) and torch.equal(on[1]["noise"], off[1]["noise"])
    assert all(np.array_equal(on[2][k], off[2][k]) for k in on[2])
    assert on[3]["fid"] == off[3]["fid"] and on[3]["kid"] == off[3]["kid"]
    err = on[4]
    assert "ODE reference heun 10 NFE" in err and ("25", "25") in BAR.findall(err)  # computed, then cached
    assert "teacher trajectories heun" in err and ("24", "24") in BAR.findall(err)
    assert "bootstrap FID" in err and "/40 [" in err  # an inner bar: cleared when done (leave=False)
    assert off[4] == ""


# --- Lightning: the bar per the policy, torchmetrics aggregates what is logged --------------------

class _SpyTrainer(pl.Trainer):
    made: list = []

    def __init__(self, *args, **kwargs):
        _SpyTrainer.made.append((kwargs, self))
        super().__init__(*args, **kwargs)


def test_distillation_trainer_bar_follows_the_policy_and_changes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fit_module.pl, "Trainer", _SpyTrainer)
    model = default_mixture().float()
    kwargs = dict(solver="amed_plugin", nfe=5, schedule=POLY, num_trajectories=128, batch_size=64, epochs=2,
                  cache_dir=tmp_path, seed=0)
    trained = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(ENV, flag)
        _SpyTrainer.made.clear()
        trained[flag] = distill(model, **kwargs)
        (made, trainer), = _SpyTrainer.made
        assert made["enable_progress_bar"] is (flag == "1")
        assert (trainer.progress_bar_callback is not None) is (flag == "1")
        # the last epoch's mean update loss, weighted by batch size (every update here sees 64 samples)
        records = trained[flag].records
        last = [r["loss"] for r in records[len(records) // 2:]]
        assert float(trainer.callback_metrics["train/epoch_loss"]) == pytest.approx(np.mean(last), rel=1e-5)
    capsys.readouterr()
    assert trained["1"].records == trained["0"].records
    for a, b in zip(trained["1"].state_dict().values(), trained["0"].state_dict().values()):
        assert torch.equal(a, b)


def test_training_stages_trainer_bar_follows_the_policy(monkeypatch, tmp_path):
    class Data:  # what make_trainer reads of a datamodule
        batch_size, train_set = 4, list(range(16))

        def setup(self, stage):
            pass

    node = {"steps": 3, "max_minutes": None, "val_every_steps": 2}
    for flag, shown in (("1", True), ("0", False)):
        monkeypatch.setenv(ENV, flag)
        trainer = make_trainer("cpu", None, node, tmp_path, Data())
        assert (trainer.progress_bar_callback is not None) is shown
    monkeypatch.delenv(ENV)
    assert make_trainer("cpu", None, node, tmp_path, Data()).progress_bar_callback is None  # pytest: no terminal


def test_validation_metrics_are_weighted_means_over_the_pass(monkeypatch, tmp_path):
    """torchmetrics aggregates val/ema_loss, val/loss, val/accuracy: the same numbers Lightning's own
    mean gave (weighted by batch size), batches of unequal size included."""
    monkeypatch.setenv(ENV, "0")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1, torch.arange(10) % 10
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)  # 4, 4, 2
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    torch.manual_seed(0)
    teacher = TeacherModule(net=TINY_NET, sigma_data=0.75)
    logged = trainer.validate(teacher, dataloaders=loader, verbose=False)[0]["val/ema_loss"]
    hp = teacher.hparams
    with torch.no_grad():  # validation_step's loss, batch by batch (its fixed noise: VAL_SEED + batch index)
        by_hand = [float(edm_loss(teacher.ema.module, x, hp.p_mean, hp.p_std,
                                  generator=torch.Generator().manual_seed(VAL_SEED + i))) * len(x)
                   for i, (x, _) in enumerate(loader)]
    assert logged == pytest.approx(sum(by_hand) / len(images), rel=1e-6)
    classifier = ClassifierModule(channels=8, feature_dim=16)
    out = trainer.validate(classifier, dataloaders=loader, verbose=False)[0]
    classifier.eval()
    with torch.no_grad():
        logits = classifier.model(images)
    assert out["val/accuracy"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert out["val/loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
