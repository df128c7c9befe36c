"""The learned grid + coefficients solver (src/amedlab/learned/): exact iPNDM when untrained, a valid
grid under any parameters, gradients everywhere, a real gain from training on the analytic mixture,
counted NFE, the cache, and clear errors for bad settings."""
import json

import pytest
import torch

from amedlab.training.loss import trajectory_loss
from amedlab.learned import LearnedSolverParams, map_to_num_points
from amedlab.learned.solver import FLOOR
from amedlab.learned.settings import check_learned_settings, label
from amedlab.specs import cell_settings
from amedlab.learned.train import cell_learned, train_learned
from amedlab.models import counting
from amedlab.models.analytic import default_mixture
from amedlab.sampling import seeded_noise
from amedlab.schedules import make_sigmas
from amedlab.solvers import Solver, make_solver
from amedlab.solvers.multistep import IPNDM


@pytest.fixture(scope="module")
def mixture():
    return default_mixture()


def _noise(seeds, dim=2):
    return seeded_noise(list(seeds), (dim,), 80.0, dtype=torch.float64)


@pytest.mark.parametrize("num_points,afs", [(3, False), (6, False), (6, True), (9, True)])
def test_untrained_is_variable_step_ipndm_on_the_schedule_grid(mixture, num_points, afs):
    base = make_sigmas("polynomial", num_points, 0.002, 80.0, 7.0)
    params = LearnedSolverParams(base)
    torch.testing.assert_close(params.sigmas().detach(), base, rtol=1e-12, atol=0)
    assert params.sigmas()[0].item() == 80.0 and params.sigmas()[-1].item() == 0.002   # ends exact
    x = _noise(range(64))
    ours = make_solver("learned", afs=afs, params=params).sample(mixture, x, params.sigmas())
    ipndm = Solver(IPNDM(4, variable_step=True), afs=afs).sample(mixture, x, base)
    torch.testing.assert_close(ours, ipndm, rtol=0, atol=1e-12)
    # and the plain rule without parameters is the same method
    plain = make_solver("learned", afs=afs).sample(mixture, x, base)
    torch.testing.assert_close(plain, ipndm, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.5, 5.0, 1e3])
def test_grid_is_strictly_decreasing_with_fixed_ends_under_any_parameters(scale):
    base = make_sigmas("polynomial", 8, 0.002, 80.0, 7.0)
    params = LearnedSolverParams(base)
    g = torch.Generator().manual_seed(int(scale))
    for _ in range(20):
        with torch.no_grad():
            params.grid_logits.copy_(scale * torch.randn(7, generator=g, dtype=torch.float64))
        s = params.sigmas()
        assert s[0].item() == 80.0 and s[-1].item() == 0.002
        assert bool((s[1:] < s[:-1]).all())
        # no interval below the floor's share of the log-sigma span
        steps = (s[:-1].log() - s[1:].log()) / (torch.log(torch.tensor(80.0 / 0.002, dtype=torch.float64)))
        assert steps.min().item() >= FLOOR / 7 * (1 - 1e-9)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # the driver's callback reads float(sigma)
def test_gradient_reaches_every_grid_time_and_coefficient(mixture):
    base = make_sigmas("polynomial", 7, 0.002, 80.0, 7.0)
    params = LearnedSolverParams(base)
    with torch.no_grad():  # away from the initial point, so no gradient vanishes by symmetry
        params.coef.add_(0.01 * torch.randn(params.coef.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = _noise(range(32))
    target = mixture.reference(x, 80.0, 0.002)
    sigmas = params.sigmas()
    sigmas.retain_grad()
    loss, _ = trajectory_loss(make_solver("learned", params=params), mixture, torch.stack([x, target], 1), sigmas)
    loss.backward()
    assert params.coef.numel() == 0 + 1 + 2 + 3 + 3 + 3  # orders 1, 2, 3, 4, 4, 4 (k - 1 free values each)
    assert bool((sigmas.grad[1:-1] != 0).all())           # every inner grid time
    assert bool((params.grid_logits.grad != 0).all())
    assert bool((params.coef.grad != 0).all())             # every coefficient
    # the corrections keep the weights summing to one (a constant slope is integrated exactly)
    for w in params.summary()["weights"]:
        assert abs(sum(w) - 1) < 1e-12


def test_training_on_the_mixture_lowers_the_error_on_held_out_seeds(mixture):
    base = make_sigmas("polynomial", 6, 0.002, 80.0, 7.0)  # NFE 5 without AFS
    train_x = _noise(range(100000, 100256))
    train_y = mixture.reference(train_x, 80.0, 0.002)
    params = train_learned(mixture, train_x, train_y, base, afs=False, batch_size=64, epochs=25, lr=0.05)
    test_x = _noise(range(400))                            # disjoint from the training seeds
    test_y = mixture.reference(test_x, 80.0, 0.002)
    with torch.no_grad():
        trained = make_solver("learned", params=params).sample(mixture, test_x, params.sigmas())
        untrained = make_solver("learned").sample(mixture, test_x, base)
    rmse = lambda a: (a - test_y).pow(2).mean().sqrt().item()  # noqa: E731
    assert rmse(trained) < 0.6 * rmse(untrained), (rmse(trained), rmse(untrained))
    assert params.meta["loss_end"] < params.meta["loss_first"]
    assert params.meta["num_trajectories"] == 256 and params.meta["updates"] == 4 * 25
    assert params.meta["train_cpu_seconds"] > 0


def test_the_denoised_loss_trains_too(mixture):
    base = make_sigmas("polynomial", 5, 0.002, 80.0, 7.0)
    x = _noise(range(100000, 100064))
    params = train_learned(mixture, x, mixture.reference(x, 80.0, 0.002), base, afs=True, batch_size=32, epochs=10,
                           lr=0.05, loss="denoised")
    assert params.meta["loss"] == "denoised" and params.meta["loss_end"] < 0.7 * params.meta["loss_first"]


@pytest.mark.parametrize("nfe,afs", [(3, False), (5, False), (5, True), (7, True), (9, False)])
def test_nfe_is_counted(mixture, nfe, afs):
    solver = make_solver("learned", afs=afs)
    n = solver.num_points(nfe)
    params = LearnedSolverParams(make_sigmas("polynomial", n, 0.002, 80.0, 7.0), meta={"afs": afs})
    with torch.no_grad():
        params.grid_logits.add_(0.3)
        params.grid_logits[0] -= 0.5
    model = counting(mixture)
    make_solver("learned", afs=afs, params=params).sample(model, _noise(range(8)), params.sigmas())
    assert model.calls == nfe


def test_sampling_refuses_another_grid_or_afs(mixture):
    base = make_sigmas("polynomial", 6, 0.002, 80.0, 7.0)
    params = LearnedSolverParams(base, meta={"afs": False})
    with torch.no_grad():
        params.grid_logits[1] += 0.5
    solver = make_solver("learned", params=params)
    with pytest.raises(ValueError, match="own 6-point grid"):
        solver.sample(mixture, _noise(range(4)), base)
    with pytest.raises(ValueError, match="afs"):
        Solver(solver.rule, afs=True).sample(mixture, _noise(range(4)), params.sigmas())


def test_mapping_to_another_nfe_keeps_a_valid_grid():
    base = make_sigmas("polynomial", 6, 0.002, 80.0, 7.0)
    params = LearnedSolverParams(base)
    with torch.no_grad():
        params.grid_logits.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4], dtype=torch.float64))
        params.coef.add_(0.1)
    same = map_to_num_points(params, 6)
    torch.testing.assert_close(same.sigmas(), params.sigmas().detach(), rtol=1e-12, atol=0)
    assert bool((same.coef == 0).all())                     # coefficients back to the AB weights
    for n in (5, 7):
        s = map_to_num_points(params, n).sigmas()
        assert len(s) == n and s[0].item() == 80.0 and s[-1].item() == 0.002 and bool((s[1:] < s[:-1]).all())


def _cfg(compose_cfg, tmp_path, *extra):
    return compose_cfg("stage=evaluate", "model=gaussian_mixture", "solver=learned", "nfe=3", "eval.seeds=0-31",
                       "eval.batch_size=64", f"cache_dir={tmp_path}", "eval.dtype=float64", "eval.ode_reference.nfe=20",
                       "solver.distill.num_trajectories=32", "solver.distill.batch_size=16", "solver.distill.epochs=2", *extra)


def _cell_learned(model, cfg, settings, cache_dir):
    from amedlab.io import plain

    return cell_learned(model, settings, plain(cfg.eval.ode_reference), int(cfg.eval.batch_size), cfg.model.name, cache_dir)


def test_cell_training_is_cached_and_verified(compose_cfg, tmp_path, mixture):
    cfg = _cfg(compose_cfg, tmp_path)
    schedule = dict(cfg.schedule)
    node = dict(cfg.solver)
    settings = cell_settings(cfg, node, schedule, range(32))
    first, info1 = _cell_learned(mixture, cfg, settings, tmp_path)
    second, info2 = _cell_learned(mixture, cfg, settings, tmp_path)
    assert info1["source"] == "trained" and info2["source"] == "cache" and info1["path"] == info2["path"]
    torch.testing.assert_close(first.sigmas(), second.sigmas(), rtol=0, atol=0)
    torch.testing.assert_close(first.coef, second.coef, rtol=0, atol=0)
    meta = second.meta
    assert meta["model_identity"] == mixture.identity() and meta["nfe"] == 3 and meta["afs"] is True  # the config's AFS
    assert meta["num_points"] == 5
    assert meta["num_trajectories"] == 32 and meta["seeds"] == "200000-200031" and meta["teacher"]["nfe"] == 20
    assert meta["schedule"]["kind"] == "polynomial" and meta["sigmas"] == first.sigmas().tolist()
    # the file itself is a solver's parameters: make_solver("learned", params=<path>) samples the same
    x = _noise(range(8))
    from_file = make_solver("learned", afs=True, params=info2["path"]).sample(mixture, x, second.sigmas())
    torch.testing.assert_close(from_file, make_solver("learned", afs=True, params=first).sample(mixture, x, first.sigmas()))
    sidecar = json.loads(open(info1["path"].replace(".pt", ".json")).read())
    assert sidecar["settings"]["num_trajectories"] == 32 and len(sidecar["records"]) == 4
    # a corrupted file is detected by its digest, removed and retrained
    raw = bytearray(open(info1["path"], "rb").read())
    raw[-200] ^= 0xFF
    open(info1["path"], "wb").write(bytes(raw))
    _, info3 = _cell_learned(mixture, cfg, settings, tmp_path)
    assert info3["source"] == "trained"
    # other training settings: another cache entry
    cfg1 = _cfg(compose_cfg, tmp_path, "solver.distill.epochs=1")
    _, info4 = _cell_learned(mixture, cfg1, cell_settings(cfg1, dict(cfg1.solver), schedule, range(32)), tmp_path)
    assert info4["source"] == "trained" and info4["path"] != info1["path"]


@pytest.mark.parametrize("key,value,accepted", [
    ("num_trajectories", 0, "an integer in [1, "), ("batch_size", 1000, "at most"), ("epochs", 1.5, "an integer in [1, "),
    ("lr", -1.0, "a finite number > 0"), ("loss", "l1", "final, denoised"), ("learn_grid", "yes", "true, false"),
    ("first_seed", -3, "an integer in [0, "), ("momentum", 0.9, "accepted: num_trajectories"),
    ("starts", [], "a non-empty list"), ("starts", [{"sigma_min": 1.0}], "{kind, rho} overrides"),
    ("starts", "time_uniform", "a non-empty list"),
])
def test_bad_settings_are_clear_errors(key, value, accepted):
    with pytest.raises(ValueError, match=f"solver.distill.*{key}") as err:
        check_learned_settings({key: value})
    assert accepted in str(err.value)


def test_the_start_with_the_lowest_training_error_is_kept_and_every_start_is_recorded(compose_cfg, tmp_path, mixture):
    from amedlab.learned.train import final_error, teacher_solutions

    cfg = _cfg(compose_cfg, tmp_path)
    settings = cell_settings(cfg, dict(cfg.solver), dict(cfg.schedule), range(32))
    assert settings["starts"] == [{}, {"kind": "time_uniform", "rho": 1.0}]  # conf/solver/learned.yaml
    params, _ = _cell_learned(mixture, cfg, settings, tmp_path)
    tried = params.meta["starts_tried"]
    assert [t["schedule"]["kind"] for t in tried] == ["polynomial", "time_uniform"]
    errors = [t["final_error"] for t in tried]
    assert errors[0] != errors[1]
    best = tried[errors.index(min(errors))]["schedule"]
    assert params.meta["start_schedule"] == best
    assert params.meta["base_sigmas"] == pytest.approx(
        make_sigmas(best["kind"], 5, best["sigma_min"], best["sigma_max"], best["rho"]).tolist(), rel=1e-12)
    noise, target, _ = teacher_solutions(mixture, cfg.eval.ode_reference, 0.002, 80.0, range(200000, 200032), tmp_path)
    assert final_error(mixture, params, noise, target, True) == pytest.approx(min(errors), rel=1e-5)  # float32
    # one start: the schedule's grid only, a single candidate
    one = cell_settings(cfg, {**dict(cfg.solver), "distill": {**dict(cfg.solver.distill), "starts": [{}]}},
                           dict(cfg.schedule), range(32))
    single, _ = _cell_learned(mixture, cfg, one, tmp_path)
    assert [t["schedule"]["kind"] for t in single.meta["starts_tried"]] == ["polynomial"]
    with pytest.raises(ValueError, match=r"solver.distill.starts\[1\]=\{'kind': 'bogus'\}"):
        cell_settings(cfg, {**dict(cfg.solver), "distill": {"starts": [{}, {"kind": "bogus"}]}}, dict(cfg.schedule), range(32))


def test_training_seeds_must_be_disjoint_from_the_evaluation_seeds():
    with pytest.raises(ValueError, match="first_seed=1000.*overlap the evaluation seeds"):
        check_learned_settings({"first_seed": 1000}, range(2000))
    assert check_learned_settings({}, range(2000))["first_seed"] == 200000


def test_stage_evaluate_rejects_bad_values_before_any_compute(compose_cfg, monkeypatch, tmp_path):
    from amedlab.errors import ConfigError
    from amedlab.specs import check_stage

    monkeypatch.chdir(tmp_path)
    base = ["stage=evaluate", "experiments=table2_digits", "solver=learned", "nfe=5", f"cache_dir={tmp_path}"]
    for override, key in (("solver.distill.lr=0", "solver.distill.lr"), ("solver.distill.loss=l2", "solver.distill.loss"),
                          ("solver.distill.first_seed=10", "solver.distill.first_seed"),
                          ("solver.options.max_order=6", "max_order"), ("nfe=0", "nfe"),
                          ("solver.distill.starts=[{kind: bogus}]", r"solver.distill.starts\[0\]"),
                          ("solver.distill.starts=[{sigma_max: 1}]", r"solver.distill.starts\[0\]")):
        with pytest.raises(ConfigError, match=key):
            check_stage(compose_cfg(*base, override), "evaluate")
    with pytest.raises(ConfigError, match="solver.distill.epoch is not a known key"):
        check_stage(compose_cfg(*base, "+solver.distill.epoch=3"), "evaluate")
    assert not list(tmp_path.glob("learned/*.pt"))  # nothing was trained


def test_row_label_says_what_is_learned():
    assert label({"name": "learned", "afs": False, "distill": {}}) == "Learned grid + coefficients (iPNDM base)"
    assert label({"name": "learned", "afs": True, "distill": {"learn_coefficients": False}}) == "Learned grid (iPNDM base, AFS)"


def test_evaluate_cell_records_the_learned_grid_and_the_counted_nfe(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from amedlab.specs import CONF_DIR
    from amedlab.stages import evaluate as evaluate_stage
    from amedlab.models.digits import make_digits_denoiser, save_denoiser

    torch.manual_seed(0)
    tiny = make_digits_denoiser(dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                     attn_resolutions=[]), sigma_data=0.75).eval().requires_grad_(False)
    model_path = save_denoiser(tiny, tmp_path / "tiny.safetensors")
    monkeypatch.chdir(tmp_path)
    overrides = ["stage=evaluate", "model=digits_unet", f"model.path={model_path}", "solver=learned", "nfe=4",
                 "eval.seeds=0-31", "eval.batch_size=16", f"cache_dir={tmp_path / 'cache'}", "eval.kid_subsets=5",
                 "eval.ode_reference.nfe=8", "solver.distill.num_trajectories=16", "solver.distill.batch_size=8",
                 "solver.distill.epochs=2", "solver.distill.lr=0.1"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    evaluate_stage.run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    schedule_grid = make_sigmas("polynomial", 6, 0.002, 80.0, 7.0).tolist()
    assert metrics["nfe_counted"] == 4 and metrics["num_points"] == 6   # AFS: 5 steps for 4 model calls
    assert metrics["label"] == "Learned grid + coefficients (iPNDM base, AFS)"
    assert metrics["sigmas"] == metrics["predictor"]["meta"]["sigmas"] != schedule_grid  # the grid used: the learned one
    assert metrics["predictor"]["source"] == "trained" and metrics["predictor"]["meta"]["num_trajectories"] == 16
    assert list((tmp_path / "cache" / "learned").glob("learned-nfe4-*.pt"))
