"""Device placement, checked on the CPU: the model stays where the caller put it, inputs go to it.

The CPU machine has one device, so a GPU bug cannot show as a wrong device here. Two stand-ins make
the two GPU failures visible: a model whose weights are on the ``meta`` device (a second device: CPU
noise fed to it fails exactly as CPU noise fed to a CUDA model does), and a model that records every
move it receives (Lightning's ``.to(device)`` at the start of ``fit`` and ``.cpu()`` at its end
reach a registered submodule through ``nn.Module._apply``).
"""
import pytest
import torch
from torch import nn

from amedlab.amed.distill import distill
from amedlab.training.placement import held_teacher, lightning_placement
from amedlab.data.trajectories import generate_trajectories
from amedlab.models.base import CountingDenoiser, Denoiser, device_of

TEACHER = {"name": "heun", "afs": False, "options": {}}
SCHEDULE = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


class Reached(Exception):
    """The meta-device model was called with inputs on its own device."""


class Recorder(Denoiser):
    """A Gaussian denoiser (data N(0, s^2 I) in 2-d) that records the device of every input and every
    move (``to``, ``cpu``, ``cuda``, ``float``, ...) it receives. On ``meta`` it computes with its
    weights (a device mismatch fails as on a GPU) and then stops: meta tensors hold no numbers."""

    feature_dim = 1
    sample_shape = (2,)

    def __init__(self, device="cpu", std: float = 0.5) -> None:
        super().__init__()
        self.log_std = nn.Parameter(torch.tensor(float(std), device=device).log())
        self.inputs: list[tuple[torch.device, torch.device]] = []
        self.moves: list[str] = []

    def _apply(self, fn, *args, **kwargs):
        self.moves.append(getattr(fn, "__qualname__", repr(fn)))
        return super()._apply(fn, *args, **kwargs)

    def denoise(self, x, sigma):
        self.inputs.append((x.device, sigma.device))
        var0 = self.log_std.exp() ** 2
        out = var0 / (var0 + sigma[:, None] ** 2) * x
        if x.device.type == "meta":
            raise Reached
        self.last_features = x.pow(2).mean(-1, keepdim=True).div(var0 + sigma[:, None] ** 2).sqrt()
        return out


def test_device_of_reads_the_weights_through_wrappers():
    assert device_of(Recorder("meta")) == torch.device("meta")
    assert device_of(CountingDenoiser(Recorder("meta"))) == torch.device("meta")
    assert device_of(Recorder()) == torch.device("cpu")
    assert device_of(lambda x, sigma: x) == torch.device("cpu")  # a plain callable: CPU


def test_teacher_noise_goes_to_the_models_device():
    # the H200 failure: noise drawn on the CPU and fed to a CUDA model ("Expected all tensors to be on
    # the same device"); here the model's weights are on meta, and the first call must get meta inputs
    model = Recorder("meta")
    with pytest.raises(Reached):
        generate_trajectories(model, TEACHER, SCHEDULE, num_points=3, M=1, seeds=range(4))
    assert model.inputs == [(torch.device("meta"), torch.device("meta"))]


def test_teacher_trajectories_come_back_on_the_cpu_and_match_any_batch_size():
    model = Recorder()
    a = generate_trajectories(model, TEACHER, SCHEDULE, num_points=3, M=1, seeds=range(6), batch_size=4)
    b = generate_trajectories(model, TEACHER, SCHEDULE, num_points=3, M=1, seeds=range(6), batch_size=6)
    assert a["states"].device.type == "cpu" and a["noise"].device.type == "cpu"
    assert torch.equal(a["states"], b["states"]) and torch.equal(a["states"][:, 0], a["noise"])
    assert {d for pair in model.inputs for d in pair} == {torch.device("cpu")}
    assert model.moves == []


@pytest.mark.parametrize("afs", [True, "mean"])  # "mean": the AMED-mean calibration call runs as well
def test_distillation_leaves_the_callers_model_as_it_was(tmp_path, afs):
    # the second H200 failure: the teacher was a submodule of the LightningModule, so Lightning's
    # .cpu() at the end of fit moved the evaluation's model off the GPU
    model = Recorder().train()
    assert model.log_std.requires_grad
    predictor = distill(model, solver="amed", nfe=3, afs=afs, num_trajectories=32, batch_size=16, cache_dir=tmp_path)
    assert model.moves == [], f"the caller's model was moved: {model.moves}"
    assert device_of(model) == torch.device("cpu")
    assert model.training and model.log_std.requires_grad  # mode and flags restored
    assert model.log_std.grad is None  # frozen during training: no gradient reached its weights
    assert predictor.meta["updates"] == 2 * 2
    assert {d for pair in model.inputs for d in pair} == {torch.device("cpu")}


def test_distillation_runs_where_the_teacher_is():
    model = Recorder()
    assert lightning_placement(model, "auto", 1) == ("cpu", 1)  # not Lightning's "any GPU"
    assert lightning_placement(model, "gpu", 1) == ("gpu", 1)  # explicit settings are kept
    assert lightning_placement(model, "auto", 2) == ("auto", 2)  # DDP: each rank's device


def test_held_teacher_restores_mode_and_flags_after_an_error():
    model = Recorder().train()
    with pytest.raises(RuntimeError), held_teacher(model):
        assert not model.training and not model.log_std.requires_grad
        raise RuntimeError("distillation failed")
    assert model.training and model.log_std.requires_grad and model.moves == []
