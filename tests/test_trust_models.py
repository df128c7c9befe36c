"""Model files and code named by configuration files.

- ``model=edm_pkl`` with ``model.trust_pickle=true``: every file that is not an NVlabs network pickle
  (EDM's training state, a truncated pickle, a project checkpoint, an empty file, random bytes, a
  dict without 'ema', ...) is one named error on ``model.path`` saying what the file is; the path
  options of every model loader say "is a folder, expected a file" / "is a file, expected a folder"
  rather than "no such file" of something that exists; unpickling a trusted file is logged.
- ``hydra.callbacks`` (instantiated by Hydra before the task function runs) and any ``_target_`` key
  in the task config are refused with one named error, and nothing they name is run.

The in-process cases go through the real ``conf/`` and the CLI's task function, as in
tests/test_reliability.py; the ``hydra.callbacks`` cases need the real command line (Hydra builds its
callbacks before the task function).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab import cli
from amedlab.specs import values as validation
from amedlab.specs import CONF_DIR
from amedlab.errors import ConfigError
from amedlab.models import build_model
from amedlab.models.digits import SHIPPED_TEACHER, make_digits_denoiser, save_denoiser

REPO = Path(__file__).resolve().parents[1]
NVLABS_TOP = ("training", "torch_utils", "dnnlib")

NETWORKS = '''
import torch
from torch import nn


class SongUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"8x8_conv": nn.Conv2d(3, 4, 3, padding=1), "4x4_block0": nn.Conv2d(4, 4, 1)})

    def forward(self, x, noise_labels, class_labels=None):
        return x


class EDMPrecond(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = 8, 3, 0
        self.model = SongUNet()

    def forward(self, x, sigma, class_labels=None, **kw):
        return x
'''
GONE = '''

class Gone(nn.Module):
    """Present when the pickle was made, removed from the source afterwards."""
'''


class Evil:
    """Unpickling this runs code: it creates the file ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


def _forget_nvlabs_modules() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in NVLABS_TOP]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A stand-in NVlabs source tree, a good network pickle and one file of each bad kind."""
    d = tmp_path_factory.mktemp("model_files")
    src = d / "edm_src"
    for package in NVLABS_TOP:
        (src / package).mkdir(parents=True)
        (src / package / "__init__.py").write_text("")
    (src / "torch_utils" / "persistence.py").write_text("# stand-in\n")
    networks = src / "training" / "networks.py"
    networks.write_text(textwrap.dedent(NETWORKS + GONE))
    sentinel = d / "PWNED"
    f = {"src": str(src), "sentinel": str(sentinel), "folder": str(d / "a_folder")}
    (d / "a_folder").mkdir()
    sys.path.insert(0, str(src))
    try:
        import training.networks as nets

        good = pickle.dumps({"ema": nets.EDMPrecond(), "augment_pipe": None})
        gone = pickle.dumps({"ema": nets.Gone()})
    finally:
        sys.path.remove(str(src))
        _forget_nvlabs_modules()
    networks.write_text(textwrap.dedent(NETWORKS))  # Gone is no longer in the source
    (d / "edm-standin.pkl").write_bytes(good)
    f["good"] = str(d / "edm-standin.pkl")
    (d / "network-snapshot-gone.pkl").write_bytes(gone)
    f["gone"] = str(d / "network-snapshot-gone.pkl")
    (d / "network-snapshot-half.pkl").write_bytes(good[: len(good) // 2])
    f["truncated"] = str(d / "network-snapshot-half.pkl")
    # a pickle that runs code early, cut before its end: refused before anything in it runs
    evil = pickle.dumps([Evil(sentinel), "x" * 4096], protocol=2)  # no frames: the unpickler runs op by op
    (d / "edm-evil-half.pkl").write_bytes(evil[: len(evil) - 2048])
    f["evil_truncated"] = str(d / "edm-evil-half.pkl")
    torch.save({"net": torch.zeros(3), "optimizer_state": {"state": {}, "param_groups": [{"lr": torch.tensor(1e-3)}]}},
               d / "training-state-000100.pt")
    f["training_state"] = str(d / "training-state-000100.pt")
    torch.manual_seed(0)
    tiny = make_digits_denoiser(dict(img_resolution=8, model_channels=8, channel_mult=[1], num_blocks=1,
                                     attn_resolutions=[]))
    f["project_pt"] = str(save_denoiser(tiny, d / "teacher.pt"))
    f["teacher"] = str(SHIPPED_TEACHER)
    (d / "edm-empty.pkl").write_bytes(b"")
    f["empty"] = str(d / "edm-empty.pkl")
    (d / "edm-random.pkl").write_bytes(random.Random(0).randbytes(4096))
    f["random"] = str(d / "edm-random.pkl")
    with open(d / "edm-plain-dict.pkl", "wb") as fh:
        pickle.dump({"net": [1, 2, 3], "kimg": 100}, fh)
    f["no_ema"] = str(d / "edm-plain-dict.pkl")
    torch.save({"ema": torch.zeros(2)}, d / "legacy.pkl", _use_new_zipfile_serialization=False)
    f["legacy"] = str(d / "legacy.pkl")
    (d / "notes.txt").write_text("a file\n")
    f["a_file"] = str(d / "notes.txt")
    unet = d / "unet_only"  # passes model=diffusers' checks up to the scheduler
    unet.mkdir()
    (unet / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    f["unet_only"] = str(unet)
    return f


@pytest.fixture(autouse=True)
def _clean_nvlabs_imports():
    """The loader puts model.source_dir on sys.path; each test starts and ends without it."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    _forget_nvlabs_modules()


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def _one_error(overrides, tmp_path, monkeypatch, capsys, model_calls) -> str:
    """Run the CLI's task function on ``overrides``: exit status 2, one error line, nothing computed
    or written; returns that line."""
    monkeypatch.chdir(tmp_path)
    cfg = _compose(["stage=compare", "compare.num_samples=8", "compare.nfes=[3]", "compare.solvers=[euler]",
                    *overrides])
    with pytest.raises(SystemExit) as exit_info:
        cli.hydra_main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err, err
    assert model_calls["n"] == 0 and _files_under(tmp_path) == []
    return err


EDM = ["model=edm_pkl", "model.trust_pickle=true", "model.source_dir='{src}'"]

# (overrides, the key named, what the message says); each a distinct bad input
MODEL_CASES = [
    ([*EDM, "model.path='{training_state}'"], "model.path", "EDM's training state"),
    ([*EDM, "model.path='{truncated}'"], "model.path", "a pickle cut short"),
    ([*EDM, "model.path='{evil_truncated}'"], "model.path", "a pickle cut short"),
    ([*EDM, "model.path='{teacher}'"], "model.path",
     "is a project checkpoint (.safetensors, kind 'amedlab.digits_unet')"),
    ([*EDM, "model.path='{project_pt}'"], "model.path", "is a project checkpoint (.pt, kind 'amedlab.digits_unet')"),
    ([*EDM, "model.path='{empty}'"], "model.path", "is an empty file"),
    ([*EDM, "model.path='{random}'"], "model.path", "is not a pickle"),
    ([*EDM, "model.path='{no_ema}'"], "model.path", "holds a dict with keys ['kimg', 'net'] and no 'ema' network"),
    ([*EDM, "model.path='{legacy}'"], "model.path", "is a legacy torch.save file"),
    ([*EDM, "model.path='{gone}'"], "model.path", "needs code that model.source_dir="),
    ([*EDM, "model.path='{folder}'"], "model.path", "is a folder, expected a file"),
    ([*EDM, "model.path='{folder}/none.pkl'"], "model.path", "no such file"),
    (["model=edm_pkl", "model.trust_pickle=true", "model.source_dir='{a_file}'", "model.path='{good}'"],
     "model.source_dir", "is a file, expected a folder"),
    (["model=edm_pkl", "model.trust_pickle=true", "model.source_dir='{folder}/none'", "model.path='{good}'"],
     "model.source_dir", "no such folder"),
    (["model=diffusers", "model.path='{a_file}'"], "model.path", "is a file, expected a folder"),
    (["model=diffusers", "model.path='{folder}/none'"], "model.path", "no such folder"),
    (["model=diffusers", "model.path='{unet_only}'", "model.scheduler_path='{a_file}'"], "model.scheduler_path",
     "is a file, expected a folder"),
    (["model=digits_unet", "model.path='{folder}'"], "model.path", "is a folder, expected a file"),
]


@pytest.mark.parametrize("overrides,key,says", MODEL_CASES, ids=[c[2] + " " + c[0][-1] for c in MODEL_CASES])
def test_a_bad_model_file_is_one_named_error(overrides, key, says, files, tmp_path, monkeypatch, capsys, model_calls):
    err = _one_error([o.format(**files) for o in overrides], tmp_path, monkeypatch, capsys, model_calls)
    assert err.startswith(f"error: {key}="), err
    assert says in err, err
    assert "accepted: " in err, err
    if key == "model.path" and "edm_pkl" in overrides[0]:
        assert "network-snapshot-*.pkl or edm-*.pkl" in err and "'ema'" in err, err
    assert not Path(files["sentinel"]).exists()


def test_each_refused_file_was_refused_before_anything_in_it_ran(files):
    """The control for the truncated case: its first half does run code when unpickled."""
    with open(files["evil_truncated"], "rb") as fh, pytest.raises(Exception):
        pickle.load(fh)  # noqa: S301 -- proves the test file really runs code before failing
    assert Path(files["sentinel"]).exists()
    Path(files["sentinel"]).unlink()


def test_a_trusted_pickle_is_logged_with_its_sha256(files, caplog):
    caplog.set_level(logging.INFO, logger="amedlab.models.adapters")
    den = build_model({"name": "edm_pkl", "path": files["good"], "trust_pickle": True, "source_dir": files["src"]})
    assert den.sample_shape == (3, 8, 8) and den.feature_block == "4x4_block0"
    digest = hashlib.sha256(Path(files["good"]).read_bytes()).hexdigest()[:16]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "unpickling" in r.getMessage()]
    assert len(lines) == 1, lines
    assert str(Path(files["good"]).resolve()) in lines[0] and digest in lines[0]
    assert "the code embedded in the pickle runs" in lines[0]


def test_an_untrusted_or_refused_pickle_is_not_logged_as_unpickled(files, caplog):
    caplog.set_level(logging.INFO, logger="amedlab.models.adapters")
    for path, trust in ((files["good"], False), (files["truncated"], True), (files["training_state"], True)):
        with pytest.raises((ConfigError, PermissionError)):
            build_model({"name": "edm_pkl", "path": path, "trust_pickle": trust, "source_dir": files["src"]})
    assert not [r for r in caplog.records if "unpickling" in r.getMessage()]


# --- _target_ keys in the task config ------------------------------------------------------------

TARGET_CASES = [
    (["+eval._target_=os.system"], "eval._target_"),
    (["+solver.options._target_=os.system"], "solver.options._target_"),  # a free node: no unknown-key check
    (["compare.solvers=[{_target_: os.system}]"], "compare.solvers[0]._target_"),
    (["+eval.schedule_per_solver.euler._target_=builtins.exec"], "eval.schedule_per_solver.euler._target_"),
]


@pytest.mark.parametrize("overrides,key", TARGET_CASES, ids=[c[1] for c in TARGET_CASES])
def test_a_target_key_anywhere_is_one_named_error(overrides, key, tmp_path, monkeypatch, capsys, model_calls):
    err = _one_error(overrides, tmp_path, monkeypatch, capsys, model_calls)
    assert err.startswith(f"error: {key}="), err
    assert "accepted: no _target_ key" in err, err


def test_the_allow_list_lets_only_the_extension_points_through(monkeypatch):
    assert validation.ALLOWED_TARGETS == ("model._target_", "solver._target_")
    cfg = _compose(["stage=compare", "+eval._target_=amedlab.models.build_model"])
    with pytest.raises(ConfigError, match=r"eval\._target_"):
        validation.check_targets(cfg)
    monkeypatch.setattr(validation, "ALLOWED_TARGETS", ("eval._target_",))
    validation.check_targets(cfg)
    validation.check_targets(_compose(["stage=compare"]))  # the shipped config has none


# --- hydra.callbacks: refused before Hydra instantiates any --------------------------------------

EVIL_EXPERIMENT = """\
# @package _global_
hydra:
  callbacks:
    evil:
      _target_: builtins.open
      file: {sentinel}
      mode: w
"""


@pytest.mark.parametrize("how", ["experiment file", "experiment file, -m sweep", "override"])
def test_hydra_callbacks_are_refused_before_any_runs(how, tmp_path):
    sentinel = tmp_path / "CALLBACK_RAN"
    conf = tmp_path / "conf"
    (conf / "experiments").mkdir(parents=True)
    (conf / "experiments" / "evil.yaml").write_text(EVIL_EXPERIMENT.format(sentinel=sentinel))
    args = ["stage=compare", "compare.num_samples=8", "compare.solvers=[euler]", f"hydra.run.dir={tmp_path}/run",
            f"hydra.sweep.dir={tmp_path}/sweep"]
    if how == "override":
        args += ["+hydra.callbacks.x._target_=builtins.open", f"+hydra.callbacks.x.file={sentinel}",
                 "+hydra.callbacks.x.mode=w", "compare.nfes=[3]"]
    else:  # options before the overrides (argparse)
        args = ["--config-dir", str(conf), *(["-m"] if "-m" in how else []), *args, "experiments=evil"]
        args += ["nfe=3,5"] if "-m" in how else ["compare.nfes=[3]"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "AMEDLAB_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "amedlab", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: hydra.callbacks="), proc.stderr
    assert "accepted: {}" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not sentinel.exists()                                     # the callback was never instantiated
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
    # the control: the same entry instantiated by Hydra does create the file
    from hydra.utils import instantiate

    instantiate({"_target_": "builtins.open", "file": str(sentinel), "mode": "w"}).close()
    assert sentinel.exists()


def test_the_callbacks_check_accepts_the_shipped_config(monkeypatch):
    from hydra._internal.callbacks import Callbacks

    monkeypatch.setattr(Callbacks, "__init__", Callbacks.__init__)  # restored after the test
    cli.refuse_hydra_callbacks()
    cli.refuse_hydra_callbacks()  # installed once
    assert getattr(Callbacks.__init__, "_amedlab_checked", False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=compare"], return_hydra_config=True)
    assert Callbacks(cfg).callbacks == []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        bad = compose(config_name="config", overrides=["+hydra.callbacks.x._target_=builtins.print"],
                      return_hydra_config=True)
    with pytest.raises(ConfigError, match=r"hydra\.callbacks="):
        Callbacks(bad)


LOGGING_EXPERIMENT = """\
# @package _global_
hydra:
  {node}:
    version: 1
    formatters:
      evil:
        "()": builtins.open
        file: {sentinel}
        mode: w
    root:
      level: INFO
"""


@pytest.mark.parametrize("node", ["job_logging", "hydra_logging"])
def test_a_logging_factory_in_an_experiment_file_is_refused_before_it_runs(node, tmp_path):
    sentinel = tmp_path / "FACTORY_RAN"
    conf = tmp_path / "conf"
    (conf / "experiments").mkdir(parents=True)
    (conf / "experiments" / "evil.yaml").write_text(LOGGING_EXPERIMENT.format(node=node, sentinel=sentinel))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "AMEDLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "amedlab", "--config-dir", str(conf), "stage=compare",
                           "compare.num_samples=8", "compare.solvers=[euler]", "compare.nfes=[3]",
                           f"hydra.run.dir={tmp_path}/run", "experiments=evil"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "logging factory" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not sentinel.exists()


@pytest.mark.parametrize("hydra_node,key", [
    ({"launcher": {"_target_": "os.system"}}, "hydra.launcher._target_"),
    ({"sweeper": {"_target_": "mypkg.Evil"}}, "hydra.sweeper._target_"),
    ({"job_logging": {"handlers": {"h": {"()": "os.system"}}}}, "hydra.job_logging"),
    ({"callbacks": {"x": {"_target_": "builtins.print"}}}, "hydra.callbacks"),
])
def test_hydra_settings_that_name_code_are_refused(hydra_node, key):
    from omegaconf import OmegaConf

    from amedlab.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key)):
        cli.check_hydra_callbacks(OmegaConf.create({"hydra": hydra_node}))
    # the shipped plug-ins pass
    cli.check_hydra_callbacks(OmegaConf.create({"hydra": {
        "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
        "job_logging": {"handlers": {"console": {"class": "logging.StreamHandler"}}}}}))
