"""Evaluation: seeded sampling, quantisation, FID / KID through torch-fidelity, references, logging."""
import json
import socket

import numpy as np
import pytest
import torch
import torch_fidelity
from hydra import compose, initialize_config_dir

from amedlab.specs import CONF_DIR
from amedlab.data.digits import digits_split, load_digits_tensors
from amedlab.stages import evaluate as evaluate_stage
from amedlab.evaluation.extractors import (DIGITS, INCEPTION, UInt8Images, check_extractor_weights, create_extractor,
                                           extract_features)
from amedlab.evaluation.fid import fid_from_features
from amedlab.sampling import generate
from amedlab.evaluation.metrics import dequantize, fid, kid, quantize, rmse
from amedlab.data.reference import ode_reference
from amedlab.evaluation.reference import real_reference
from amedlab.wandb_logger import make_logger
from amedlab.models.digits import make_digits_denoiser, save_denoiser
from amedlab.sampling import parse_seeds
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver

TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])



@pytest.fixture(scope="module")
def tiny_denoiser():
    torch.manual_seed(0)
    return make_digits_denoiser(TINY_NET, sigma_data=0.75).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def digits_uint8():
    images, _ = load_digits_tensors()
    train, held_out = digits_split()
    return quantize(images[train]), quantize(images[held_out])


@pytest.fixture(scope="module")
def digits_extractor():
    return create_extractor(DIGITS, None)


def test_seeds_and_quantisation():
    assert parse_seeds("0-4,10") == [0, 1, 2, 3, 4, 10]
    assert len(parse_seeds("0-49999")) == 50000
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    # the paper's (x * 127.5 + 128).clip(0, 255) to uint8
    assert quantize(x).tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert (dequantize(quantize(x)) - x.clamp(-1, 1)).abs().max() <= 0.5 / 127.5 + 1e-6


@pytest.mark.parametrize("solver_name", ["ipndm", "dpm2"])
def test_sample_i_depends_on_seed_i_only(tiny_denoiser, solver_name):
    solver = make_solver(solver_name, afs=solver_name == "dpm2")
    sigmas = make_sigmas("polynomial", solver.num_points(5))
    seeds = parse_seeds("0-39")
    a, nfe_a = generate(tiny_denoiser, solver, sigmas, seeds, batch_size=7)
    b, nfe_b = generate(tiny_denoiser, solver, sigmas, seeds, batch_size=64)
    assert nfe_a == nfe_b == 5
    assert torch.equal(quantize(a), quantize(b))                     # identical images
    assert (a - b).abs().max().item() < 1e-4                         # float32 kernels may differ by rounding only
    part, _ = generate(tiny_denoiser, solver, sigmas, seeds[30:40], batch_size=4)   # a different split of the seeds
    assert torch.equal(quantize(part), quantize(a[30:40]))
    assert (a[0] - a[1]).abs().max() > 0.1                           # and different seeds differ


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(digits_uint8, digits_extractor):
    train, held_out = digits_uint8
    f_train = extract_features(digits_extractor, train)
    assert f_train.shape == (1437, 64)
    assert abs(fid(f_train, f_train)) < 1e-6
    # torch-fidelity's FID agrees with the project's Frechet distance (fid.py)
    f_held = extract_features(digits_extractor, held_out)
    ours = fid(f_train, f_held)
    assert ours == pytest.approx(fid_from_features(f_train, f_held), rel=1e-5)
    assert 0.1 < ours < 20.0                                        # two real halves: small but not zero
    g = torch.Generator().manual_seed(0)
    clean = dequantize(train)
    values = []
    for std in (0.05, 0.2, 0.5):
        noisy = quantize(clean + std * torch.randn(clean.shape, generator=g))
        values.append(fid(extract_features(digits_extractor, noisy), f_train))
    assert values[0] > 0.1 and values[0] < values[1] < values[2], values
    assert values[2] > 10 * ours


def test_registered_extractor_works_through_torch_fidelity_calculate_metrics(digits_uint8, digits_extractor):
    train, held_out = digits_uint8
    out = torch_fidelity.calculate_metrics(
        input1=UInt8Images(held_out), input2=UInt8Images(train), fid=True, kid=True, feature_extractor=DIGITS,
        kid_subset_size=300, kid_subsets=10, cuda=False, cache=False, verbose=False, save_cpu_ram=True)
    f_train, f_held = extract_features(digits_extractor, train), extract_features(digits_extractor, held_out)
    assert out["frechet_inception_distance"] == pytest.approx(fid(f_held, f_train), rel=1e-4)
    ours = kid(f_held, f_train, subsets=10, subset_size=300, seed=2020)
    assert out["kernel_inception_distance_mean"] == pytest.approx(ours["kid_mean"], rel=1e-3, abs=1e-6)
    # the subset size is clamped to the smaller set, never an error
    small = kid(f_held[:50], f_train, subsets=5, subset_size=1000)
    assert small["kid_subset_size"] == 50


def test_inception_without_a_local_file_is_a_clear_error_and_never_downloads(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    import torch_fidelity.feature_extractor_inceptionv3 as fe_inception

    monkeypatch.setattr(fe_inception, "load_state_dict_from_url", no_network)
    with pytest.raises(ValueError, match="eval.inception_weights"):
        check_extractor_weights(INCEPTION, None)
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        check_extractor_weights(INCEPTION, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="eval.inception_weights"):
        create_extractor(INCEPTION, None)
    # a file that is not Inception's weights fails on loading, not by going to the network
    bogus = tmp_path / "bogus.pth"
    torch.save({"not": torch.zeros(1)}, bogus)
    assert check_extractor_weights(INCEPTION, str(bogus)) == str(bogus)
    with pytest.raises(RuntimeError, match="state_dict"):
        create_extractor(INCEPTION, str(bogus))

    # through the stage: the error comes before any compute (no model is built)
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the configuration was checked")

    monkeypatch.setattr("amedlab.models.build_model", no_model)
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["stage=evaluate", "model=digits_unet", "eval.feature_extractor=inception-v3-compat"])
    with pytest.raises(ValueError, match="eval.inception_weights=null"):
        evaluate_stage.run(cfg)


def test_inception_pipeline_with_a_stand_in_weights_file(tmp_path, monkeypatch, digits_uint8):
    """The Inception path end to end (uint8 1-channel images -> RGB -> 2048-d features -> FID, real data
    from a folder of PNGs) with randomly initialised weights saved to a local file: the real weights
    cannot be fetched here, so the numbers are meaningless, the mechanics are not."""
    from PIL import Image
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with monkeypatch.context() as m:  # build a randomly initialised network to save as the "weights file"
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, **kw: None)
        bogus = tmp_path / "empty.pth"
        torch.save({}, bogus)
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(bogus))
    weights = tmp_path / "inception-standin.pth"
    torch.save(net.state_dict(), weights)
    train, _ = digits_uint8
    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(train[i, 0].numpy(), mode="L").save(folder / f"{i}.png")
    from omegaconf import OmegaConf

    real = real_reference({"source": "path", "path": str(folder)}, OmegaConf.create({"name": "digits"}), INCEPTION,
                          check_extractor_weights(INCEPTION, str(weights)), tmp_path / "cache", batch_size=3)
    assert real["features"].shape == (2, 2048) and real["description"]["num_images"] == 2
    assert real["mu"].shape == (2048,) and real["sigma"].shape == (2048, 2048)
    fe = create_extractor(INCEPTION, str(weights))
    same = extract_features(fe, train[:2], batch_size=1)        # 1 channel is repeated to RGB
    assert torch.allclose(same, real["features"], atol=1e-4)    # the PNG round trip is lossless


def test_references_are_computed_once_and_cached(tmp_path, tiny_denoiser):
    from omegaconf import OmegaConf

    dataset = OmegaConf.create({"name": "digits", "image_size": 8, "upsample_mode": "bilinear",
                                "held_out_fraction": 0.2, "split_seed": 0})
    real_cfg = {"source": "dataset", "split": "held_out", "path": None}
    first = real_reference(real_cfg, dataset, DIGITS, None, tmp_path)
    second = real_reference(real_cfg, dataset, DIGITS, None, tmp_path)
    assert not first["description"]["cached"] and second["description"]["cached"]
    assert first["description"]["num_images"] == 360
    assert np.array_equal(first["mu"], second["mu"]) and torch.equal(first["features"], second["features"])

    ref_cfg = {"solver": {"name": "heun", "afs": False, "options": {}}, "nfe": 10, "schedule": {"kind": "polynomial", "rho": 7.0}}
    seeds = parse_seeds("0-15")
    x1, info1 = ode_reference(tiny_denoiser, ref_cfg, 0.002, 80.0, seeds, tmp_path, batch_size=16)
    x2, info2 = ode_reference(tiny_denoiser, ref_cfg, 0.002, 80.0, seeds, tmp_path, batch_size=5)
    assert not info1["cached"] and info2["cached"] and torch.equal(x1, x2)
    assert x1.shape == (16, 1, 8, 8)
    # the trajectory error of a coarse solver against it is positive and shrinks with NFE
    errors = []
    for nfe in (3, 9):
        solver = make_solver("ipndm")
        out, _ = generate(tiny_denoiser, solver, make_sigmas("polynomial", solver.num_points(nfe)), seeds, 16)
        errors.append(rmse(out, x1))
    assert errors[0] > errors[1] > 0


def test_evaluate_stage_writes_metrics_and_skips_a_finished_cell(tmp_path, tiny_denoiser, monkeypatch):
    model_path = save_denoiser(tiny_denoiser, tmp_path / "tiny.safetensors")
    monkeypatch.chdir(tmp_path)  # run_dir() outside Hydra is the current directory
    overrides = ["stage=evaluate", "model=digits_unet", f"model.path={model_path}", "solver=dpm2", "nfe=3",
                 "eval.seeds=0-39", "eval.batch_size=16", f"cache_dir={tmp_path / 'cache'}", "eval.kid_subsets=5",
                 "eval.ode_reference.nfe=8", "+eval.schedule_per_solver.dpm2={kind: logsnr}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    fid_value = evaluate_stage.run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["complete"] and metrics["fid"] == fid_value > 0
    assert metrics["nfe_counted"] == 3 and metrics["num_points"] == 3 and metrics["num_samples"] == 40
    assert metrics["schedule"]["kind"] == "logsnr"                        # the schedule actually used
    assert metrics["label"] == "DPM-Solver-2 (AFS)" and metrics["kid_subset_size"] == 40
    assert metrics["rmse"] > 0 and (tmp_path / "samples.png").is_file()
    mtime = (tmp_path / "metrics.json").stat().st_mtime_ns
    assert evaluate_stage.run(cfg) == fid_value                         # finished: skipped, file untouched
    assert (tmp_path / "metrics.json").stat().st_mtime_ns == mtime
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        other = compose("config", overrides=overrides[:-1] + ["eval.seeds=0-19"])
    evaluate_stage.run(other)                                            # another cell: recomputed
    assert json.loads((tmp_path / "metrics.json").read_text())["num_samples"] == 20


def test_wandb_logger_is_offline_by_default_and_never_hangs(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / "logger" / "wandb.yaml")
    assert cfg.mode == "offline"
    with make_logger(cfg, "test-run", "test-group", "test", tmp_path) as logger:
        assert logger.mode == "offline"
        logger.log_config(OmegaConf.create({"a": 1}))
        logger.log_metrics({"fid": 1.5, "timing": {"total_s": 2.0}}, summary=True)
        logger.log_distillation([{"interval": 0, "loss": 1.0}, {"interval": 1, "loss": 0.5}])
        logger.log_table("table", ["solver", "NFE 5"], [["iPNDM", 1.0]])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # online with no reachable server: falls back to offline within init_timeout
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    online = OmegaConf.merge(cfg, {"mode": "online", "init_timeout": 2})
    with make_logger(online, "test-online", None, "test", tmp_path / "online") as logger:
        assert logger.mode == "offline"
    with pytest.raises(ValueError, match="logger.mode='sometimes'"):
        make_logger(OmegaConf.merge(cfg, {"mode": "sometimes"}), "x", None, "test", tmp_path)


def test_one_logger_settings_reader_offline_by_default():
    """The evaluation's RunLogger and the training's Lightning loggers read the same settings."""
    from omegaconf import OmegaConf

    from amedlab.wandb_logger import logger_settings

    assert not logger_settings(None).wandb and not logger_settings({"name": "none"}).wandb
    s = logger_settings(OmegaConf.create({"name": "wandb", "tags": ["a"], "entity": ""}))
    assert s.wandb and s.mode == "offline" and s.project == "amedlab" and s.entity is None and s.tags == ("a",)
    assert not logger_settings({"name": "wandb", "mode": "disabled"}).wandb
    with pytest.raises(ValueError, match=r"logger.mode='sometimes'; accepted: offline, online, disabled"):
        logger_settings({"name": "wandb", "mode": "sometimes"})
