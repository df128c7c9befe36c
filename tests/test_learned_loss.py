"""The learned solver's teacher-feature losses (solver.distill.loss=teacher_features, final+teacher_features):
the features are the sampled teacher's own feature block, differentiable; the loss is zero when the
student lands on the teacher's solution, it goes down under training on a tiny U-Net teacher, and a
bad value or a denoiser without a feature block is a named error before any compute."""
import pytest
import torch

from amedlab.learned import LearnedSolverParams
from amedlab.learned.settings import LOSSES, check_learned_settings, label
from amedlab.learned.train import LearnedDistillation, train_learned
from amedlab.models.analytic import default_mixture
from amedlab.models.precond import EDMPrecond
from amedlab.models.unet import SmallUNet
from amedlab.sampling import seeded_noise
from amedlab.schedules import make_sigmas
from amedlab.solvers import Solver, make_solver
from amedlab.training.loss import feature_block_of, squared_error, teacher_features

FEATURE_LOSSES = ("teacher_features", "final+teacher_features")
SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def teacher():
    """A tiny EDM U-Net (random weights, the zero-initialised output layer made non-zero so that D is
    not just the skip path), frozen, float64."""
    torch.manual_seed(0)
    net = SmallUNet(img_resolution=4, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
    with torch.no_grad():
        net.out_conv.weight.normal_(0, 0.3)
    model = EDMPrecond(net, sigma_data=0.5, sample_shape=SHAPE, feature_block=net.feature_block).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _noise(seeds):
    return seeded_noise(list(seeds), SHAPE, 80.0, dtype=torch.float64)


def _teacher_solution(model, noise):
    fine = make_sigmas("polynomial", 41, 0.002, 80.0, 7.0)
    with torch.no_grad():
        return make_solver("heun").sample(model, noise, fine)


def test_features_are_the_teachers_own_block_and_differentiable(teacher):
    module, block = feature_block_of(teacher)
    assert block == teacher.feature_block and module is teacher.net.get_submodule(block)
    hooks = len(module._forward_hooks)
    x = _noise(range(5)).div(80.0).requires_grad_()
    denoised, feats = teacher_features(teacher, x, 0.002)
    # the full block output [B, C * H * W], not the channel mean AMED reads
    assert feats.shape == (5, 16 * 2 * 2) and feats.dtype == x.dtype
    torch.testing.assert_close(denoised, teacher(x.detach(), torch.full((5,), 0.002, dtype=x.dtype)))
    feats.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert len(module._forward_hooks) == hooks  # its hook is removed after the pass (the model's own stays)


@pytest.mark.parametrize("loss", FEATURE_LOSSES)
def test_loss_is_zero_when_the_student_lands_on_the_teacher(teacher, loss):
    base = make_sigmas("polynomial", 5, 0.002, 80.0, 7.0)
    params = LearnedSolverParams(base)
    noise = _noise(range(8))
    method = LearnedDistillation(teacher, params, afs=True, lr=0.01, loss=loss, feature_scale=0.7)
    with torch.no_grad():
        own = Solver(method.rule, afs=True).sample(teacher, noise, params.sigmas())  # the student's own final sample
        own_feats = teacher_features(teacher, own, 0.002)[1]
        (update,) = list(method.updates((noise, own, own_feats), None))
    assert update.loss.item() == pytest.approx(0.0, abs=1e-20)
    # and not zero against another target
    with torch.no_grad():
        other = own + 0.1
        (update,) = list(method.updates((noise, other, teacher_features(teacher, other, 0.002)[1]), None))
    assert update.loss.item() > 1e-3


@pytest.mark.parametrize("loss", FEATURE_LOSSES)
def test_training_lowers_the_teacher_feature_error_on_held_out_seeds(teacher, loss):
    base = make_sigmas("polynomial", 4, 0.002, 80.0, 7.0)
    train_noise, held_noise = _noise(range(1000, 1064)), _noise(range(64))
    train_target, held_target = _teacher_solution(teacher, train_noise), _teacher_solution(teacher, held_noise)
    params = train_learned(teacher, train_noise, train_target, base, afs=False, max_order=3, loss=loss,
                           batch_size=16, epochs=8, lr=0.05)
    assert params.meta["loss"] == loss and params.meta["feature_scale"] > 0
    assert params.meta["loss_end"] < params.meta["loss_first"]

    def feature_error(p):
        with torch.no_grad():
            x = make_solver("learned", afs=False, max_order=3, params=p).sample(teacher, held_noise, p.sigmas())
            return squared_error(teacher_features(teacher, x, 0.002)[1], teacher_features(teacher, held_target, 0.002)[1]).item()

    assert feature_error(params) < 0.9 * feature_error(LearnedSolverParams(base, 3))


@pytest.mark.parametrize("value", ["features", "teacher", "final+denoised", "classifier_features"])
def test_a_bad_loss_is_a_named_error(value):
    with pytest.raises(ValueError, match="solver.distill.loss") as err:
        check_learned_settings({"loss": value})
    assert "teacher_features" in str(err.value) and "final+teacher_features" in str(err.value)
    noise = _noise(range(4))
    with pytest.raises(ValueError, match="solver.distill.loss"):
        train_learned(default_mixture(), seeded_noise(range(4), (2,), 80.0, dtype=torch.float64),
                      noise.flatten(1)[:, :2], make_sigmas("polynomial", 4, 0.002, 80.0, 7.0), loss=value, batch_size=2)


@pytest.mark.parametrize("loss", FEATURE_LOSSES)
def test_the_feature_losses_are_accepted_and_labelled(loss):
    assert loss in LOSSES and check_learned_settings({"loss": loss})["loss"] == loss
    assert f"{loss} loss" in label({"afs": True, "distill": {"loss": loss}})


@pytest.mark.parametrize("loss", FEATURE_LOSSES)
def test_a_denoiser_without_a_feature_block_is_refused_before_training(loss):
    mixture = default_mixture()
    noise = seeded_noise(range(8), (2,), 80.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="no feature block"):
        train_learned(mixture, noise, noise / 80.0, make_sigmas("polynomial", 4, 0.002, 80.0, 7.0), loss=loss, batch_size=4)
