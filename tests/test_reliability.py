"""Reliability: every bad input is a named error before any compute; nothing stale or corrupted is
reused; no code runs from a user's file; float64 sampling works on the digits teacher.

The bad inputs run in-process through the real ``conf/`` (Hydra's compose API) and the CLI's task
function, which turns a user error into one line on stderr and exit status 2. A global counter on
``Denoiser.forward`` proves that nothing was computed first; the run and cache directories must hold
no file afterwards. A few cases go through the real command line as well.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab import cli
from amedlab.amed import AMEDPredictor
from amedlab.specs import CONF_DIR
from amedlab.evaluation.evaluate import check_finite
from amedlab.stages import evaluate as evaluate_stage
from amedlab.models.base import Denoiser
from amedlab.models.digits import SHIPPED_TEACHER, load_denoiser, make_digits_denoiser, save_denoiser
from amedlab.schedules import make_sigmas
from amedlab.errors import ResultError, UserError
from amedlab.specs import check_stage

REPO = Path(__file__).resolve().parents[1]
TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
POLY = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


class Evil:
    """Unpickling this runs code: it creates the file ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


def _tiny(seed: int):
    """A tiny digits U-Net; its zero-initialised layers are perturbed so that two seeds differ."""
    torch.manual_seed(seed)
    model = make_digits_denoiser(TINY_NET, sigma_data=0.75).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _predictor(model, solver: str, nfe: int, seed: int = 0, options=None) -> AMEDPredictor:
    num_points = {3: 3, 5: 4, 7: 5}[nfe]
    torch.manual_seed(seed)
    p = AMEDPredictor(feature_dim=model.feature_dim, s_dir=0.01)
    p.meta = {"solver": solver, "solver_options": dict(options or {}), "nfe": nfe, "num_points": num_points,
              "sigmas": make_sigmas("polynomial", num_points).tolist(), "schedule": POLY, "afs": True,
              "model_identity": model.identity(), "model_name": "digits_unet"}
    return p


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    sentinel = d / "PWNED"
    model = _tiny(0)
    f = {"dir": str(d), "sentinel": str(sentinel)}
    f["tiny"] = str(save_denoiser(model, d / "tiny.safetensors"))
    (d / "notes.txt").write_text("not a checkpoint\n")
    f["txt"] = str(d / "notes.txt")
    (d / "text.safetensors").write_text("hello, I am text\n")
    f["text_st"] = str(d / "text.safetensors")
    (d / "garbage.pt").write_bytes(random.Random(0).randbytes(4096))
    f["garbage_pt"] = str(d / "garbage.pt")
    torch.save({"kind": "amedlab.digits_unet", "config": {}, "state_dict": Evil(sentinel)}, d / "evil.pt")
    f["evil_pt"] = str(d / "evil.pt")
    for name in ("evil.pkl", "evil.npy", "evil.npz", "evil.pth"):
        with open(d / name, "wb") as fh:
            pickle.dump(Evil(sentinel), fh)
        f[name.replace(".", "_")] = str(d / name)
    from amedlab.models.digits_features import SHIPPED_CLASSIFIER

    f["classifier"] = str(SHIPPED_CLASSIFIER)          # a checkpoint of another kind than a teacher
    f["amed_pred"] = str(_predictor(model, "amed", 5).save(d / "amed5.pt"))
    f["plugin_pred"] = str(_predictor(model, "amed_plugin", 5, options={"base": "ipndm", "max_order": 4}).save(d / "plugin5.pt"))
    other = _predictor(_tiny(1), "amed", 5)
    f["other_model_pred"] = str(other.save(d / "other_model.pt"))
    (d / "a_file").write_text("x")
    f["a_file"] = str(d / "a_file")
    np.save(d / "floats.npy", np.zeros((4, 8, 8, 1), np.float32))
    f["floats_npy"] = str(d / "floats.npy")
    (d / "empty_dir").mkdir()
    f["empty_dir"] = str(d / "empty_dir")
    torch.save({"fc.weight": "not a tensor"}, d / "not_state_dict.pth")
    f["not_state_dict"] = str(d / "not_state_dict.pth")
    return f


BASE = {
    "evaluate": ["stage=evaluate", "model=digits_unet", "model.path={tiny}", "eval.seeds=0-7", "eval.batch_size=8",
                 "eval.kid_subsets=2", "eval.ode_reference.nfe=6", "cache_dir={run}/cache",
 "distill.num_trajectories=16", "distill.batch_size=8"],
    "distill": ["stage=distill", "model=digits_unet", "model.path={tiny}", "solver=amed", "cache_dir={run}/cache",
                "distill.num_trajectories=16", "distill.batch_size=8"],
    "compare": ["stage=compare", "compare.num_samples=8", "compare.nfes=[3]", "compare.solvers=[euler]"],
    "table": ["stage=table", "sweep_dir={dir}"],
    "train_teacher": ["stage=train_teacher", "train.teacher.steps=1"],
    "train_features": ["stage=train_features", "train.features.steps=1"],
    "analyze_trajectories": ["stage=analyze_trajectories", "analysis.num_samples=4"],
}

# (stage, overrides, the key the message must name)
CASES = [
    # -- stage=evaluate: values --
    ("evaluate", ["nfe=abc"], "nfe"),
    ("evaluate", ["nfe=0"], "nfe"),
    ("evaluate", ["solver=heun", "nfe=4"], "nfe"),                       # unreachable with AFS (odd NFE only)
    ("evaluate", ["eval.seeds=[]"], "eval.seeds"),
    ("evaluate", ["eval.seeds=abc"], "eval.seeds"),
    ("evaluate", ["eval.seeds=9-3"], "eval.seeds"),
    ("evaluate", ["eval.batch_size=0"], "eval.batch_size"),
    ("evaluate", ["solver=amed", "eval.batch_size=0"], "eval.batch_size"),
    ("evaluate", ["eval.dtype=float16"], "eval.dtype"),
    ("evaluate", ["eval.precision=int8"], "eval.precision"),
    ("evaluate", ["eval.kid_subsets=0"], "eval.kid_subsets"),
    ("evaluate", ["eval.kid_subset_size=1"], "eval.kid_subset_size"),
    ("evaluate", ["eval.kid=maybe"], "eval.kid"),
    ("evaluate", ["eval.num_threads=0"], "eval.num_threads"),
    ("evaluate", ["eval.skip_finished=perhaps"], "eval.skip_finished"),
    ("evaluate", ["eval.feature_extractor=clip"], "eval.feature_extractor"),
    ("evaluate", ["eval.feature_extractor=inception-v3-compat"], "eval.inception_weights"),
    ("evaluate", ["eval.real.source=web"], "eval.real.source"),
    ("evaluate", ["eval.real.split=test"], "eval.real.split"),
    ("evaluate", ["eval.real.source=path"], "eval.real.path"),
    ("evaluate", ["eval.real.source=path", "eval.real.path={dir}/missing.npz"], "eval.real.path"),
    ("evaluate", ["eval.real.source=path", "eval.real.path={floats_npy}"], "eval.real.path"),
    ("evaluate", ["eval.real.source=path", "eval.real.path={empty_dir}"], "eval.real.path"),
    ("evaluate", ["eval.ode_reference.nfe=0"], "eval.ode_reference.nfe"),
    ("evaluate", ["eval.ode_reference.solver.name=rk4"], "eval.ode_reference.solver"),
    ("evaluate", ["eval.ode_reference.schedule.kind=cosine"], "eval.ode_reference.schedule.kind"),
    ("evaluate", ["+eval.sedes=0-9"], "eval.sedes"),
    ("evaluate", ["+solver.predcitor=x"], "solver.predcitor"),
    ("evaluate", ["+eval.schedule_per_solver.euler={{kind: cosine}}"], "eval.schedule_per_solver.euler"),
    ("evaluate", ["+eval.schedule_per_solver.amde={{kind: time_uniform}}"], "eval.schedule_per_solver.amde"),
    ("evaluate", ["+eval.schedule_per_solver.heun={{kind: logsnr, rh: 2}}"], "eval.schedule_per_solver.heun"),
    ("evaluate", ["schedule.rho=-1"], "schedule.rho"),
    ("evaluate", ["schedule.sigma_min=0"], "schedule.sigma_min"),
    ("evaluate", ["schedule.sigma_max=abc"], "schedule.sigma_max"),
    ("evaluate", ["schedule.sigma_max=0.001"], "schedule.sigma_max"),
    ("evaluate", ["solver.afs=maybe"], "solver.afs"),
    ("evaluate", ["solver.final_step=end"], "solver.final_step"),
    ("evaluate", ["model=digits_unet", "solver=amed_plugin_vs_traj", "solver.distill.objective=greedy"], "solver.distill.objective"),
    ("evaluate", ["model=digits_unet", "solver=amed_plugin_vs_traj", "solver.distill.intermediate_weight=-1"], "solver.distill.objective"),
    ("evaluate", ["solver=ipndm", "+solver.options.order=3"], "solver"),
    ("evaluate", ["solver=ipndm", "solver.options.max_order=9"], "solver"),
    ("evaluate", ["seed=-1"], "seed"),
    ("evaluate", ["device=gpu"], "device"),
    ("evaluate", ["device=cuda:99"], "device"),
    ("evaluate", ["cache_dir={a_file}/cache"], "cache_dir"),
    ("evaluate", ["logger=wandb", "logger.mode=sometimes"], "logger"),
    # -- stage=evaluate: files --
    ("evaluate", ["model.path={dir}/missing.safetensors"], "model.path"),
    ("evaluate", ["model.path={txt}"], "model.path"),
    ("evaluate", ["model.path={text_st}"], "model.path"),
    ("evaluate", ["model.path={garbage_pt}"], "model.path"),
    ("evaluate", ["model.path={evil_pt}"], "model.path"),
    ("evaluate", ["model.path={classifier}"], "model.path"),
    ("evaluate", ["model=edm_pkl", "model.path={evil_pkl}"], "model.trust_pickle"),
    ("evaluate", ["model=gaussian_mixture"], "model"),
    ("evaluate", ["eval.digits_classifier={dir}/missing.safetensors"], "eval.digits_classifier"),
    ("evaluate", ["eval.digits_classifier={tiny}"], "eval.digits_classifier"),
    ("evaluate", ["eval.digits_classifier={evil_pt}"], "eval.digits_classifier"),
    ("evaluate", ["eval.feature_extractor=inception-v3-compat", "eval.inception_weights={txt}"], "eval.inception_weights"),
    ("evaluate", ["eval.feature_extractor=inception-v3-compat", "eval.inception_weights={evil_pth}"], "eval.inception_weights"),
    ("evaluate", ["eval.feature_extractor=inception-v3-compat", "eval.inception_weights={not_state_dict}"], "eval.inception_weights"),
    ("evaluate", ["eval.real.source=path", "eval.real.path={evil_npy}"], "eval.real.path"),
    ("evaluate", ["eval.real.source=path", "eval.real.path={evil_npz}"], "eval.real.path"),
    ("evaluate", ["solver=amed", "solver.predictor={dir}/missing.pt"], "solver.predictor"),
    ("evaluate", ["solver=amed", "solver.predictor={evil_pt}"], "solver.predictor"),
    ("evaluate", ["solver=amed", "solver.predictor={garbage_pt}"], "solver.predictor"),
    ("evaluate", ["solver=amed_plugin", "solver.predictor={amed_pred}"], "solver.predictor"),   # trained for amed
    ("evaluate", ["solver=amed", "solver.predictor={plugin_pred}"], "solver.predictor"),       # trained for the plug-in
    ("evaluate", ["solver=amed", "nfe=7", "solver.predictor={amed_pred}"], "solver.predictor"),
    ("evaluate", ["solver=amed", "solver.afs=false", "nfe=6", "solver.predictor={amed_pred}"], "solver.predictor"),
    ("evaluate", ["solver=amed", "solver.predictor={other_model_pred}"], "solver.predictor"),
    # -- an AMED cell that would distill --
    ("evaluate", ["solver=amed", "distill.num_trajectories=4"], "distill.num_trajectories"),
    ("evaluate", ["solver=amed", "distill.lr=-1"], "distill.lr"),
    ("evaluate", ["solver=amed", "solver.distill.M=-1"], "solver.distill.M"),
    ("evaluate", ["solver=amed", "solver.distill.s_dir=2"], "solver.distill.s_dir"),
    ("evaluate", ["solver=amed", "solver.distill.teacher.name=rk4"], "solver.distill.teacher"),
    ("evaluate", ["solver=amed", "predictor.hidden_dim=0"], "predictor.hidden_dim"),
    ("evaluate", ["solver=amed", "cache_dir={a_file}/t"], "cache_dir"),
    # -- stage=distill --
    ("distill", ["solver=euler"], "solver"),
    ("distill", ["distill.num_trajectories=4"], "distill.num_trajectories"),
    ("distill", ["distill.epochs=0"], "distill.epochs"),
    ("distill", ["distill.lr_schedule=linear"], "distill.lr_schedule"),
    ("distill", ["nfe=4"], "nfe"),
    ("distill", ["model.path={garbage_pt}"], "model.path"),
    ("distill", ["distill.devices=0"], "distill.devices"),
    # -- stage=compare --
    ("compare", ["compare.nfes=[abc]"], "compare.nfes"),
    ("compare", ["compare.solvers=[rk4]"], "compare.solvers"),
    ("compare", ["compare.dtype=float8"], "compare.dtype"),
    ("compare", ["compare.num_samples=0"], "compare.num_samples"),
    ("compare", ["model=digits_unet"], "model"),
    ("compare", ["+compare.seeds=3"], "compare.seeds"),
    # -- stage=table --
    ("table", ["sweep_dir=null"], "sweep_dir"),
    ("table", ["sweep_dir={dir}/missing"], "sweep_dir"),
    ("table", ["table.metrics=[is]"], "table.metrics"),
    # -- training and analysis --
    ("train_teacher", ["train.teacher.steps=0"], "train.teacher.steps"),
    ("train_teacher", ["train.teacher.lr=abc"], "train.teacher.lr"),
    ("train_features", ["train.features.batch_size=-1"], "train.features.batch_size"),
    ("analyze_trajectories", ["analysis.num_samples=0"], "analysis.num_samples"),
    ("analyze_trajectories", ["analysis.dtype=half"], "analysis.dtype"),
    ("analyze_trajectories", ["+analysis.amed.predictors.5='{evil_pt}'"], "analysis.amed.predictors.5"),
    ("evaluate", ["stage=sample"], "stage"),
]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _overrides(stage, extra, files, run):
    base = BASE[stage]
    if any(o.startswith("model=") for o in extra):  # another model group: the base's model keys do not apply
        base = [o for o in base if not o.startswith("model")]
    return [o.format(run=run, **files) for o in base + list(extra)]


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("stage", sorted(BASE))
def test_each_stage_base_config_passes_the_checks(stage, files, tmp_path, monkeypatch, model_calls):
    """The control: what the cases below change is the only thing wrong with them."""
    monkeypatch.chdir(tmp_path)
    check_stage(_compose(_overrides(stage, [], files, tmp_path)), stage)
    assert model_calls["n"] == 0 and _files_under(tmp_path) == []


@pytest.mark.parametrize("stage,extra,key", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_input_is_one_named_error_before_any_compute(stage, extra, key, files, tmp_path, monkeypatch, capsys,
                                                         model_calls):
    monkeypatch.chdir(tmp_path)  # the run directory outside Hydra
    cfg = _compose(_overrides(stage, extra, files, tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        cli.hydra_main(cfg)                                  # the CLI's task function: message + exit status
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert key in err, err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    assert model_calls["n"] == 0                             # nothing computed first
    assert _files_under(tmp_path) == []                      # no metrics, no cache files
    assert not Path(files["sentinel"]).exists()              # nothing from a user's file was run


def _torch_file(p):
    torch.save({"x": torch.arange(10)}, p)


def _safetensors_file(p):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(p))


def _read_checkpoint(p):
    from amedlab.models.digits import load_checkpoint

    return load_checkpoint(p, "amedlab.digits_unet")


def _read_state_dict(p):
    from amedlab.evaluation.extractors import load_state_dict_file

    return load_state_dict_file(p, "eval.extractor_weights")


def _read_real(p):
    from amedlab.evaluation.reference import real_source_from_path

    return real_source_from_path(p)


@pytest.mark.parametrize("suffix, make, read", [
    (".pt", _torch_file, _read_checkpoint),
    (".safetensors", _safetensors_file, _read_checkpoint),
    (".pt", _torch_file, _read_state_dict),
    (".safetensors", _safetensors_file, _read_state_dict),
    (".npy", lambda p: np.save(p, np.zeros((4, 8, 8, 1), np.uint8)), _read_real),
    (".npz", lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(3)), _read_real),
])
def test_any_damaged_or_random_file_is_refused_with_one_value_error(suffix, make, read, tmp_path):
    """Loaders raise whatever damaged bytes provoke (the weights-only unpickler an IndexError, numpy's
    header parser a TokenError, ...); every reader the user's paths reach must turn each into a
    ValueError (CI once drew random bytes that raised IndexError). 200 files: random bytes, and a
    real file truncated with a few bytes flipped."""
    good = tmp_path / f"good{suffix}"
    make(good)
    whole = good.read_bytes()
    rng = random.Random(1)
    for i in range(200):
        if i % 2:
            data = bytearray(whole[: rng.randrange(1, len(whole))])
        else:
            data = bytearray(rng.randbytes(rng.choice([1, 8, 64, 4096])))
        for _ in range(rng.randrange(0, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"damaged{suffix}"
        path.write_bytes(bytes(data))
        with pytest.raises(ValueError):
            read(path)


def test_the_table_holds_at_least_40_bad_inputs_across_stages():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) >= 6


@pytest.mark.parametrize("args,key", [
    (["stage=evaluate", "model=digits_unet", "nfe=abc"], "nfe"),
    (["stage=evaluate", "model=digits_unet", "+eval.sedes=0-9"], "eval.seeds"),
    (["stage=evaluate", "model=digits_unet", "model.path={garbage_pt}"], "model.path"),
    (["stage=evaluate", "model=gaussian_mixture"], "model"),
    (["stage=evaluate", "solver=rk4"], "solver"),
    (["-m", "stage=evaluate", "model=digits_unet", "eval.kid_subsets=0", "nfe=3,5"], "eval.kid_subsets"),
    (["stage=compare", "hydra.run.dir={a_file}/run"], "hydra.run.dir"),      # an output directory that cannot be made
])
def test_the_command_line_prints_one_message_and_no_traceback(args, key, files, tmp_path):
    env = {**os.environ, "AMEDLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [a.format(**files) for a in args]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args += [f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run([sys.executable, "-m", "amedlab", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "weights_only=False" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert not list(tmp_path.rglob("metrics.json")) and not [p for p in tmp_path.rglob("cache/**/*") if p.is_file()]


def test_a_malicious_pickle_given_to_every_path_option_runs_nothing(files, tmp_path, monkeypatch):
    """Each path option gets a file whose unpickling would create ``sentinel``: all are refused."""
    from amedlab.evaluation.extractors import INCEPTION, create_extractor

    monkeypatch.chdir(tmp_path)
    sentinel = Path(files["sentinel"])
    options = {
        "model.path": ["model.path={evil_pt}"],
        "model.path (edm_pkl)": ["model=edm_pkl", "model.path={evil_pkl}"],
        "solver.predictor": ["solver=amed", "solver.predictor={evil_pt}"],
        "eval.inception_weights": ["eval.feature_extractor=inception-v3-compat", "eval.inception_weights={evil_pth}"],
        "eval.inception_weights (.pt)": ["eval.feature_extractor=inception-v3-compat", "eval.inception_weights={evil_pt}"],
        "eval.digits_classifier": ["eval.digits_classifier={evil_pt}"],
        "eval.real.path (.npy)": ["eval.real.source=path", "eval.real.path={evil_npy}"],
        "eval.real.path (.npz)": ["eval.real.source=path", "eval.real.path={evil_npz}"],
    }
    for name, extra in options.items():
        with pytest.raises(UserError):
            check_stage(_compose(_overrides("evaluate", extra, files, tmp_path)), "evaluate")
        assert not sentinel.exists(), name
    # the library calls themselves: tensors only
    for call in (lambda: create_extractor(INCEPTION, files["evil_pth"]), lambda: AMEDPredictor.load(files["evil_pt"]),
                 lambda: load_denoiser(files["evil_pt"])):
        with pytest.raises(ValueError, match="nothing in it was run"):
            call()
        assert not sentinel.exists()
    # the control: the same object unpickled without restriction does create the file
    with open(files["evil_pkl"], "rb") as fh:
        pickle.load(fh)  # noqa: S301 -- proves the test file is really malicious
    assert sentinel.exists()
    sentinel.unlink()


# ------------------------------------------------------------------------------------------------
# nothing stale, nothing corrupted
# ------------------------------------------------------------------------------------------------

def _evaluate(overrides, tmp_path):
    cfg = _compose(overrides)
    evaluate_stage.run(cfg)
    return json.loads((tmp_path / "metrics.json").read_text())


def test_a_replaced_model_or_predictor_file_at_the_same_path_is_recomputed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model_path = tmp_path / "model.safetensors"
    save_denoiser(_tiny(0), model_path)
    base = [o.format(run=tmp_path, tiny=model_path) for o in BASE["evaluate"]] + ["solver=euler", "nfe=3"]
    first = _evaluate(base, tmp_path)
    _evaluate(base, tmp_path)
    assert "finished already" in capsys.readouterr().out                 # same files: skipped
    save_denoiser(_tiny(1), model_path)                                  # another model at the same path
    second = _evaluate(base, tmp_path)
    assert "finished already" not in capsys.readouterr().out
    assert second["model"]["identity"] != first["model"]["identity"] and second["fid"] != first["fid"]

    pred_path = tmp_path / "pred.pt"
    model = load_denoiser(model_path)
    _predictor(model, "amed", 5, seed=0).save(pred_path)
    amed = base[:-2] + ["solver=amed", "nfe=5", f"solver.predictor={pred_path}"]
    a = _evaluate(amed, tmp_path)
    _evaluate(amed, tmp_path)
    assert "finished already" in capsys.readouterr().out
    _predictor(model, "amed", 5, seed=1).save(pred_path)                 # other weights, same path and meta
    b = _evaluate(amed, tmp_path)
    assert "finished already" not in capsys.readouterr().out
    assert b["predictor"]["sha256"] != a["predictor"]["sha256"] and b["rmse"] != a["rmse"]


def flip_payload_byte(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor stored in a torch.save zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def test_every_cache_with_flipped_bytes_is_detected_rebuilt_and_gives_identical_numbers(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    model_path = save_denoiser(_tiny(0), tmp_path / "model.safetensors")
    overrides = [o.format(run=tmp_path, tiny=model_path) for o in BASE["evaluate"]] + [
        "solver=amed", "nfe=3", "eval.skip_finished=false", "eval.ode_reference.chunk_size=4"]
    clean = _evaluate(overrides, tmp_path)
    assert clean["predictor"]["source"] == "distilled"
    cache = tmp_path / "cache"
    kinds = {"real-data statistics": sorted((cache / "real_stats").glob("*.pt")),
             "high-NFE reference": sorted((cache / "ode_references").glob("*.pt")),
             "AMED predictor": sorted((cache / "predictors").glob("*.pt")),
             "teacher trajectories": sorted((cache / "trajectories").glob("*.pt"))}
    assert all(len(v) >= 1 for v in kinds.values()), kinds
    for kind, paths in kinds.items():
        target = paths[-1]
        flip_payload_byte(target)
        caplog.clear()
        # the trajectories are read only when a predictor is distilled: bypass the predictor cache then
        extra = ["eval.predictor_cache=false"] if kind == "teacher trajectories" else []
        with caplog.at_level(logging.WARNING):
            again = _evaluate(overrides + extra, tmp_path)
        assert "failed verification" in caplog.text and str(target) in caplog.text, kind
        for metric in ("fid", "kid_mean", "rmse"):
            assert again[metric] == clean[metric], (kind, metric)
        from amedlab.cache import load_verified

        assert load_verified(target) is not None, kind                  # rebuilt, intact
        if kind == "AMED predictor":
            assert again["predictor"]["source"] == "distilled"


def test_no_complete_metrics_file_holds_nan_or_inf():
    with pytest.raises(ResultError, match="fid"):
        check_finite({"fid": float("nan"), "rmse": 0.1}, "cell")
    with pytest.raises(ResultError, match=r"timing.total_s"):
        check_finite({"fid": 1.0, "timing": {"total_s": float("inf")}}, "cell")
    check_finite({"fid": 1.0, "kid_mean": None, "rmse": 0.2, "sigmas": [80.0, 0.002]}, "cell")


def test_a_nan_sample_writes_no_metrics(tmp_path, monkeypatch, capsys):
    """A model that returns NaN: the cell fails with one message and leaves no metrics.json."""
    monkeypatch.chdir(tmp_path)
    model_path = save_denoiser(_tiny(0), tmp_path / "model.safetensors")
    cfg = _compose([o.format(run=tmp_path, tiny=model_path) for o in BASE["evaluate"]] + ["nfe=3"])
    forward = Denoiser.forward
    monkeypatch.setattr(Denoiser, "forward", lambda self, x, s: forward(self, x, s) * float("nan"))
    with pytest.raises(SystemExit):
        cli.hydra_main(cfg)
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------
# numerics
# ------------------------------------------------------------------------------------------------

def test_float64_sampling_on_the_digits_teacher():
    from amedlab.models import counting
    from amedlab.solvers import make_solver

    model = counting(load_denoiser(SHIPPED_TEACHER))
    x = torch.randn(8, *model.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    sigmas = make_sigmas("polynomial", 6)
    out64 = make_solver("ipndm").sample(model, x, sigmas)
    out32 = make_solver("ipndm").sample(model, x.float(), sigmas)
    assert out64.dtype == torch.float64 and model.calls == 10 and torch.isfinite(out64).all()
    assert (out64 - out32.double()).abs().max().item() < 1e-3          # the network runs float32 inside
    assert model.last_features.dtype == torch.float32                    # the float32 call's features


def test_float64_evaluate_cell_on_a_digits_unet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_path = save_denoiser(_tiny(0), tmp_path / "model.safetensors")
    overrides = [o.format(run=tmp_path, tiny=model_path) for o in BASE["evaluate"]] + ["solver=dpm2", "nfe=3"]
    m32 = _evaluate(overrides, tmp_path)
    m64 = _evaluate(overrides + ["eval.dtype=float64"], tmp_path)
    assert m64["complete"] and m64["nfe_counted"] == 3
    assert m64["rmse"] == pytest.approx(m32["rmse"], rel=1e-2)


def test_every_amed_solver_accepts_the_shared_distillation_keys(files, tmp_path, monkeypatch, model_calls):
    """solver=amed reads solver.distill.objective like the plug-in does (one DistillSpec): added with
    ``+`` it passes the unknown-key check, a misspelling of it does not."""
    monkeypatch.chdir(tmp_path)
    plan = check_stage(_compose(_overrides("evaluate", ["solver=amed", "+solver.distill.objective=trajectory"], files,
                                           tmp_path)), "evaluate")
    assert plan.trained_settings.objective == "trajectory" and plan.trained.key == "distill"
    with pytest.raises(UserError, match="solver.distill.objectve"):
        check_stage(_compose(_overrides("evaluate", ["solver=amed", "+solver.distill.objectve=trajectory"], files,
                                        tmp_path)), "evaluate")
    assert model_calls["n"] == 0
