"""stage=export and the three ways out: solver.json's own loop (and the numpy loop of docs/export.md),
the diffusers LearnedScheduler (a random-weight UNet2DModel built here), and the k-diffusion sampler
(also through k-diffusion's own DiscreteEpsDDPMDenoiser). Each equals amedlab's sampler on the same
model and noise."""
import json
import re
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab.errors import (ConfigError, DigestMismatchError, ExportError, ParametrisationError, SchemaVersionError,
                            WrongModelError, WrongNFEError)
from amedlab.interop.export import learned_solver_json, load_amed_predictor, write_solver_json
from amedlab.interop.k_diffusion import sample_learned
from amedlab.interop.solver_json import ExportedSolver
from amedlab.learned.solver import LearnedSolverParams
from amedlab.models import build_model
from amedlab.models.digits import make_digits_denoiser, save_denoiser
from amedlab.sampling import seeded_noise
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver
from amedlab.specs import CONF_DIR
from amedlab.stages import export as export_stage

REPO = Path(__file__).resolve().parents[1]
TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
LEARNED_TINY = ["solver.distill.num_trajectories=32", "solver.distill.batch_size=16", "solver.distill.epochs=2",
                "eval.ode_reference.nfe=20", "eval.seeds=0-31"]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    torch.manual_seed(0)
    model = make_digits_denoiser(TINY_NET, sigma_data=0.75).eval().requires_grad_(False)
    return model, save_denoiser(model, tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@pytest.fixture(scope="module")
def exported_digits(tiny_digits, tmp_path_factory):
    """stage=export of a learned solver (trained now, tiny budget) for the digits teacher stand-in."""
    _, path = tiny_digits
    out = tmp_path_factory.mktemp("export")
    cfg = _cfg("stage=export", "model=digits_unet", f"model.path={path}", "solver=learned", "nfe=5",
               f"export.dir={out}", *LEARNED_TINY)
    result = export_stage.run(cfg)
    return out, result


def _trained_solver(cache: Path, model, nfe: int):
    """The learned solver the cell trained (from the cache), built the project's way."""
    for f in (cache / "learned").glob("*.pt"):
        params = LearnedSolverParams.load(f)
        if params.meta.get("nfe") == nfe and params.meta.get("model_identity") == model.identity():
            return make_solver("learned", params=params, afs=params.meta["afs"]), params
    raise AssertionError(f"no learned solver for NFE {nfe} in {cache / 'learned'}")


def test_stage_export_writes_a_verified_solver_json_whose_loop_equals_amedlab(exported_digits, tiny_digits):
    import os

    model, _ = tiny_digits
    out, result = exported_digits
    record = json.loads((out / "solver.json").read_text())
    assert record["schema_version"] == 1 and record["nfe"] == 5 and record["afs"] is True and record["max_order"] == 4
    assert len(record["sigmas"]) == 7 and [len(w) for w in record["weights"]] == [1, 2, 3, 4, 4, 4]
    assert record["model"]["identity"] == model.identity() and record["model"]["sample_shape"] == [1, 8, 8]
    assert record["provenance"]["trained_for"]["num_trajectories"] == 32
    assert record["provenance"]["self_check"]["max_relative_difference"] == result["self_check"] < 1e-12
    exported = ExportedSolver.load(out, nfe=5, model_identity=model.identity())
    solver, params = _trained_solver(Path(os.environ["AMEDLAB_CACHE"]), model, 5)
    # the weights are the AB weights of the learned times plus the learned corrections: not iPNDM's
    assert exported.sigmas == pytest.approx(params.sigmas().tolist(), rel=1e-15)
    assert max(abs(a - b) for w, v in zip(exported.weights[1:], params.summary()["weights"][1:]) for a, b in zip(w, v)) == 0
    assert any(abs(c) > 1e-4 for c in params.coef.tolist())
    x = seeded_noise(range(6), (1, 8, 8), exported.sigmas[0])
    sigmas = torch.tensor(exported.sigmas, dtype=torch.float64)
    with torch.no_grad():
        ours = solver.sample(model, x.clone(), sigmas)
        theirs = exported.sample(model, x.clone())
    assert float((ours - theirs).abs().max() / ours.abs().max()) < 1e-5
    # the 30-line numpy loop printed in docs/export.md, run as a reader would copy it
    code = re.search(r"```python\n(# solver_loop.py.*?)```", (REPO / "docs" / "export.md").read_text(), re.S).group(1)
    scope = {}
    exec(compile(code, "docs/export.md", "exec"), scope)
    with torch.no_grad():
        numpy_model = lambda xs, s: model(torch.from_numpy(xs), torch.full((len(xs),), s, dtype=torch.float64)).numpy()
        out_np = scope["sample"](str(out / "solver.json"), numpy_model, x.double().numpy())
    assert np.abs(out_np - ours.double().numpy()).max() / float(ours.abs().max()) < 1e-5


def test_a_bad_solver_json_is_a_named_error(exported_digits, tiny_digits, tmp_path):
    model, _ = tiny_digits
    out, _ = exported_digits
    record = json.loads((out / "solver.json").read_text())
    with pytest.raises(WrongNFEError, match="trained for NFE 5, not 7"):
        ExportedSolver.load(out, nfe=7)
    with pytest.raises(WrongModelError, match="not for the model given"):
        ExportedSolver.load(out, model_identity="0123456789abcdef")
    edited = dict(record, weights=[[1.0]] + record["weights"][1:])
    edited["weights"][1] = [1.0, 0.0]
    (tmp_path / "solver.json").write_text(json.dumps(edited))
    with pytest.raises(DigestMismatchError, match="does not match its digest"):
        ExportedSolver.load(tmp_path)
    (tmp_path / "solver.json").write_text(json.dumps(dict(record, schema_version=2)))
    with pytest.raises(SchemaVersionError, match="schema_version=2; this amedlab reads schema_version 1"):
        ExportedSolver.load(tmp_path)
    (tmp_path / "solver.json").write_text("{not json")
    with pytest.raises(ExportError, match="not JSON"):
        ExportedSolver.load(tmp_path)
    with pytest.raises(ExportError, match="sigmas: this solver samples on its own 7-point grid"):
        sample_learned(model, torch.zeros(1, 1, 8, 8), make_sigmas("polynomial", 7), solver=out)


def test_exporting_for_another_model_or_nfe_and_an_untrained_rule_are_named(tiny_digits, tmp_path):
    model, path = tiny_digits
    sigmas = make_sigmas("polynomial", 5)
    params = LearnedSolverParams(sigmas, 4, meta={"model_identity": "0123456789abcdef", "model_name": "other", "nfe": 3})
    solver = make_solver("learned", params=params, afs=True)
    with pytest.raises(WrongModelError, match="trained for model 'other'"):
        learned_solver_json(solver, model, 3, "digits_unet", {})
    params.meta["model_identity"] = model.identity()
    with pytest.raises(WrongNFEError, match="nfe=5: this learned solver was trained for NFE 3"):
        learned_solver_json(solver, model, 5, "digits_unet", {})
    with pytest.raises(ConfigError, match="solver='ipndm'.*stage=export writes a trained solver.*accepted: amed, amed_plugin, learned"):
        export_stage.run(_cfg("stage=export", "model=digits_unet", f"model.path={path}", "solver=ipndm",
                              f"export.dir={tmp_path}"))
    with pytest.raises(ConfigError, match="model='gaussian_mixture'.*exposes none another program could hook"):
        export_stage.run(_cfg("stage=export", "model=gaussian_mixture", "solver=amed", "nfe=3", f"export.dir={tmp_path}"))
    assert list(tmp_path.iterdir()) == []


def test_an_amed_predictor_exports_as_safetensors_with_its_feature_hook(tiny_digits, tmp_path):
    import os

    from amedlab.amed import AMEDPredictor

    model, path = tiny_digits
    cfg = _cfg("stage=export", "model=digits_unet", f"model.path={path}", "solver=amed", "nfe=3",
               "distill.num_trajectories=16", "distill.batch_size=8", f"export.dir={tmp_path}")
    export_stage.run(cfg)
    predictor, record = load_amed_predictor(tmp_path)
    assert record["feature_hook"] == {"backend": "EDMPrecond", "block": model.feature_block,
                                      "reduce": "channel mean of the block's output", "dim": model.feature_dim}
    assert record["rule"] == "amed" and record["nfe"] == 3 and record["model"]["identity"] == model.identity()
    cached = [AMEDPredictor.load(f) for f in (Path(os.environ["AMEDLAB_CACHE"]) / "predictors").glob("*.pt")]
    cached = [p for p in cached if p.meta.get("model_identity") == model.identity() and p.meta.get("nfe") == 3]
    assert cached
    feats, t0, t1 = torch.randn(4, model.feature_dim), torch.full((4,), 10.0), torch.full((4,), 2.0)
    for a, b in zip(predictor(feats, t0, t1), cached[0](feats, t0, t1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (tmp_path / "predictor.safetensors").write_bytes((tmp_path / "predictor.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DigestMismatchError, match="weights do not match"):
        load_amed_predictor(tmp_path)


# -- a diffusers VP UNet (random weights), its learned solver, the scheduler and k-diffusion --

@pytest.fixture(scope="module")
def vp_unet(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=None)
    unet.save_pretrained(root / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "scheduler")
    model = build_model({"name": "diffusers", "path": str(root), "scheduler_path": None, "feature_block": "mid_block"})
    return root, model


def _learned_for(model, nfe: int, afs: bool, seed: int = 0):
    """A learned solver as training leaves one: a moved grid and non-zero corrections (random here)."""
    n = nfe + 1 + int(afs)
    params = LearnedSolverParams(make_sigmas("polynomial", n, sigma_min=0.02, sigma_max=80.0), 4,
                                 meta={"model_identity": model.identity(), "model_name": "tiny-ddpm", "nfe": nfe, "afs": afs})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params.grid_logits.add_(0.3 * torch.randn(params.grid_logits.shape, generator=g, dtype=torch.float64))
        params.coef.add_(0.05 * torch.randn(params.coef.shape, generator=g, dtype=torch.float64))
    return make_solver("learned", params=params, afs=afs), params


@pytest.mark.parametrize("afs, final_step", [(True, "sigma_min"), (False, "denoise")])
def test_the_diffusers_scheduler_in_the_usual_loop_equals_amedlab(vp_unet, tmp_path, afs, final_step):
    from amedlab.interop.diffusers import LearnedScheduler

    root, model = vp_unet
    nfe = 5
    solver, params = _learned_for(model, nfe - int(final_step == "denoise"), afs)
    solver = make_solver("learned", params=params, afs=afs, final_step=final_step)
    params.meta["nfe"] = nfe
    exported = learned_solver_json(solver, model, nfe, "tiny-ddpm", {"test": True})
    write_solver_json(exported, solver, model.double(), tmp_path)
    model.float()
    scheduler = LearnedScheduler.from_pretrained(tmp_path)
    unet = diffusers.UNet2DModel.from_pretrained(root / "unet").eval()

    x = seeded_noise(range(3), (1, 8, 8), 1.0)
    scheduler.set_timesteps(nfe)
    assert len(scheduler.timesteps) == nfe
    sample = x * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(sample, t), t).sample
            sample = scheduler.step(eps, t, sample).prev_sample
        ours = solver.sample(model, x * exported.sigmas[0], torch.tensor(exported.sigmas, dtype=torch.float64))
    assert float((sample - ours).abs().max() / ours.abs().max()) < 1e-4
    # saved and loaded again the diffusers way: the same scheduler
    scheduler.save_pretrained(tmp_path / "saved")
    again = LearnedScheduler.from_pretrained(tmp_path / "saved")
    assert again.exported == scheduler.exported and torch.equal(again.timesteps, scheduler.timesteps)
    with pytest.raises(WrongNFEError, match="num_inference_steps=7: this solver was trained for NFE 5"):
        scheduler.set_timesteps(7)
    with pytest.raises(ParametrisationError, match="trained on a epsilon-prediction model; the model given predicts v_prediction"):
        LearnedScheduler.from_pretrained(tmp_path, prediction_type="v_prediction")


def test_the_diffusers_scheduler_refuses_a_solver_of_an_edm_model(exported_digits):
    from amedlab.interop.diffusers import LearnedScheduler

    out, _ = exported_digits
    with pytest.raises(ParametrisationError, match="trained on a EDMPrecond model.*not a diffusers VP UNet"):
        LearnedScheduler.from_pretrained(out)


def test_sample_learned_equals_amedlab_directly_and_through_k_diffusion_wrappers(vp_unet, tmp_path):
    import k_diffusion as K

    root, model = vp_unet
    solver, params = _learned_for(model, 5, True, seed=1)
    exported = learned_solver_json(solver, model, 5, "tiny-ddpm", {})
    x = seeded_noise(range(3), (1, 8, 8), exported.sigmas[0])
    sigmas = torch.tensor(exported.sigmas, dtype=torch.float64)
    with torch.no_grad():
        ours = solver.sample(model, x.clone(), sigmas)
    seen = []
    direct = sample_learned(model, x.clone(), solver=exported, disable=True, callback=lambda d: seen.append(d["i"]))
    assert float((direct - ours).abs().max() / ours.abs().max()) < 1e-5 and seen == list(range(6))

    # k-diffusion's own wrapper of a DDPM epsilon model, and its sampler calling convention
    unet = diffusers.UNet2DModel.from_pretrained(root / "unet").eval()
    alphas_cumprod = diffusers.DDPMScheduler.from_pretrained(root / "scheduler").alphas_cumprod

    class Eps(torch.nn.Module):
        def forward(self, x_in, t):
            return unet(x_in, t).sample

    denoiser = K.external.DiscreteEpsDDPMDenoiser(Eps(), alphas_cumprod, quantize=False)
    own_sigmas = torch.tensor(exported.sigmas + [0.0])  # k-diffusion's grids end in 0
    through_k = sample_learned(denoiser, x.clone(), own_sigmas, extra_args={}, disable=True, solver=exported)
    assert float((through_k - ours).abs().max() / ours.abs().max()) < 1e-5
    with pytest.raises(ExportError, match="samples on its own 7-point grid"):
        sample_learned(denoiser, x.clone(), K.sampling.get_sigmas_karras(7, 0.02, 80.0), solver=exported)
