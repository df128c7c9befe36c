"""docs/extending.md, run: a user's Denoiser and StepRule (registered, and named by ``_target_``), and a
plain callable D(x, sigma) through AMED's distillation and the learned solver.

The example files are the page's own fenced blocks (first line ``# <file name>``), written to tmp_path:
the page and these tests cannot drift apart.
"""
import importlib
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amedlab
from amedlab.models import CallableDenoiser, build_model, counting
from amedlab.models import factory
from amedlab.models.analytic import Gaussian
from amedlab.models.callable import NO_FEATURES
from amedlab import solvers
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver, rule_class

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
POLY = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def doc_files() -> dict[str, str]:
    """{file name: content} of the page's fenced blocks whose first line is ``# <name>.py|.yaml``."""
    files = {}
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", DOC.read_text(), flags=re.S):
        first = block.splitlines()[0]
        m = re.fullmatch(r"# ([\w./-]+\.(?:py|yaml))", first.strip())
        if m:
            files[m.group(1)] = block
    return files


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The page's files in tmp_path, tmp_path on sys.path, ``my_extensions`` imported (its
    registrations undone afterwards)."""
    files = doc_files()
    assert {"my_extensions.py", "run_example.py", "plain_callable.py", "myconf/model/shifted_gaussian.yaml",
            "myconf/solver/ralston.yaml"} <= set(files), sorted(files)
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(factory, "_BUILDERS", dict(factory._BUILDERS))
    monkeypatch.setattr(solvers, "_RULES", dict(solvers._RULES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_extensions", raising=False)
    module = importlib.import_module("my_extensions")
    yield tmp_path, module
    sys.modules.pop("my_extensions", None)


def _noise(n, seed=0, dtype=torch.float64):
    return 80.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- the example model and step rule, from Python ----------------------------------------------------

def test_the_python_example_runs_and_the_new_rule_is_second_order(example, capsys):
    tmp_path, ext = example
    runpy.run_path(str(tmp_path / "run_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = {line.split(" NFE ")[0].strip(): line for line in out.splitlines() if " NFE " in line}
    assert set(rows) == {"euler", "heun", "ralston", "ralston alpha=0.75", "ralston (_target_)"}, out
    assert all(" NFE 8 " in line for line in rows.values()), out  # counted, not inferred
    rmse = {k: float(v.rsplit("RMSE", 1)[1]) for k, v in rows.items()}
    assert rmse["ralston"] < 0.5 * rmse["euler"], rmse
    assert rmse["ralston (_target_)"] == rmse["ralston"]

    model = build_model({"name": "shifted_gaussian", "mean": 1.0})
    assert isinstance(model, ext.ShiftedGaussian) and model.sample_shape == (2,)
    x_T, sigmas = _noise(64), make_sigmas("polynomial", 5, 0.002, 80.0, 7.0)
    with torch.no_grad():
        # alpha = 1 is EDM's Heun, alpha = 1/2 the midpoint method: the same numbers
        assert torch.allclose(make_solver("ralston", alpha=1.0).sample(model, x_T, sigmas),
                              make_solver("heun").sample(model, x_T, sigmas), rtol=1e-12, atol=1e-12)
        assert torch.allclose(make_solver("ralston", target="my_extensions.Ralston", alpha=0.5).sample(model, x_T, sigmas),
                              make_solver("midpoint").sample(model, x_T, sigmas), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"solver 'ralston' has no option beta; accepted: afs, final_step, alpha"):
        make_solver("ralston", beta=1)


def test_a_target_model_gets_the_other_keys_and_is_checked_before_anything_is_called(example, tmp_path):
    _, ext = example
    model = build_model({"name": "custom", "_target_": "my_extensions.ShiftedGaussian", "dim": 3, "std": 0.25})
    assert type(model) is ext.ShiftedGaussian and model.sample_shape == (3,) and model.std == 0.25
    from omegaconf import OmegaConf

    node = OmegaConf.create({"name": "custom", "_target_": "my_extensions.ShiftedGaussian", "dim": 4})
    assert build_model(node).sample_shape == (4,)  # a config node as the command line passes it

    sentinel = tmp_path / "called"
    (tmp_path / "user_code.py").write_text(
        "from pathlib import Path\n"
        f"SENTINEL = Path({str(sentinel)!r})\n"
        "def make_model(**kwargs):\n    SENTINEL.write_text('function')\n"
        "class NotADenoiser:\n    def __init__(self, **kwargs):\n        SENTINEL.write_text('class')\n")
    cases = [
        ("user_code.make_model", "is a function, not a class: it must subclass amedlab.models.base.Denoiser"),
        ("user_code.NotADenoiser", "must subclass amedlab.models.base.Denoiser"),
        ("os.system", "not a class: it must subclass amedlab.models.base.Denoiser"),
        ("user_code.Missing", "module user_code has no attribute Missing"),
        ("no_such_module_here.Model", "no module 'no_such_module_here' on the Python path"),
        ("ShiftedGaussian", "is not a dotted path"),
    ]
    for target, says in cases:
        with pytest.raises(ValueError) as err:
            build_model({"name": "custom", "_target_": target})
        msg = str(err.value)
        assert msg.startswith(f"model._target_={target!r}") and says in msg and "accepted: " in msg, msg
    assert not sentinel.exists()  # nothing was called
    with pytest.raises(ValueError, match=r"model\.size=8 is not an argument of my_extensions\.ShiftedGaussian "
                                         r"\(model\._target_\); accepted: dim, mean, std"):
        build_model({"name": "custom", "_target_": "my_extensions.ShiftedGaussian", "size": 8})


def test_a_target_rule_is_checked_before_anything_is_called(example):
    _, ext = example
    assert rule_class("my_extensions.Ralston") is ext.Ralston
    solver = make_solver("my_rk2", target="my_extensions.Ralston", alpha=0.75)
    assert solver.rule.alpha == 0.75 and solver.nfe(5) == 8 and solver.num_points(8) == 5
    for target, says in [("my_extensions.ShiftedGaussian", "must subclass amedlab.solvers.base.StepRule"),
                         ("my_extensions.build_shifted_gaussian", "is a function, not a class"),
                         ("my_extensions.Nope", "module my_extensions has no attribute Nope")]:
        with pytest.raises(ValueError) as err:
            make_solver("x", target=target)
        assert str(err.value).startswith(f"solver._target_={target!r}") and says in str(err.value), str(err.value)
    with pytest.raises(ValueError, match=r"solver 'x' \(my_extensions.Ralston\) has no option beta"):
        make_solver("x", target="my_extensions.Ralston", beta=1.0)


# --- a plain callable: AMED with features=, the learned solver without -------------------------------

def _gaussian_fn():
    g = Gaussian(dim=2, mean=0.5, std=0.5)
    fn = lambda x, sigma: g.denoise(x, sigma)  # noqa: E731 -- a plain callable, no Denoiser around it
    # [N, 1]: the Gaussian's own feature (the normalised distance to the mean), as a separate function
    features = lambda x, sigma: (x - 0.5).pow(2).sum(-1, keepdim=True).div(2 * (0.25 + sigma[:, None] ** 2)).sqrt()  # noqa: E731
    return g, fn, features


def _scaled(scale):
    return lambda x, sigma: scale * x / (1 + sigma[:, None] ** 2)


def test_the_wrapper_identity_shape_checks_and_pass_through():
    a, b = CallableDenoiser(_scaled(1.0), (2,)), CallableDenoiser(_scaled(1.0), (2,))
    assert a.identity() == b.identity()  # the same code and closure: one model (caches, predictors)
    assert CallableDenoiser(_scaled(2.0), (2,)).identity() != a.identity()  # another closure value
    assert CallableDenoiser(_scaled(1.0), (2,), identity="v1").identity() != a.identity()
    assert CallableDenoiser(_scaled(1.0), (3,)).identity() != a.identity()
    x = torch.ones(4, 2)
    assert torch.allclose(a(x, 1.0), 0.5 * x) and a.last_features is None and a.feature_dim == 0
    with pytest.raises(ValueError, match=r"returned \(4,\) for x of shape \(4, 2\)"):
        CallableDenoiser(lambda x, sigma: x[:, 0], (2,))(x, 1.0)
    with pytest.raises(ValueError, match=r"sample_shape=\(\); accepted: the shape of one sample"):
        CallableDenoiser(_scaled(1.0), ())
    # a Denoiser with features added: its identity follows the model's (and the features' code)
    g = Gaussian(dim=2, mean=0.5, std=0.5)
    wrapped = CallableDenoiser(g, g.sample_shape, features=lambda x, sigma: x[:, :1])
    assert wrapped.feature_dim == 1 and wrapped.reference is not None and torch.equal(wrapped.data_mean, g.data_mean)
    before = wrapped.identity()
    with torch.no_grad():
        g.means.add_(1.0)
    assert wrapped.identity() != before


def test_distill_on_a_plain_callable_needs_features_and_says_how(example):
    _, fn, _ = _gaussian_fn()
    no_hook = CallableDenoiser(fn, (2,))
    assert no_hook.feature_dim == 0
    for model in (fn, no_hook):
        with pytest.raises(ValueError) as err:
            amedlab.distill(model, solver="amed", nfe=3, schedule=POLY, num_trajectories=8, batch_size=8)
        assert str(err.value) == NO_FEATURES
    assert str(err.value) == (
        "the model exposes no per-sample features (feature_dim = 0); AMED's predictor needs them: pass "
        "features=lambda x, sigma: ... returning [N, F], or use a Denoiser with a feature hook (docs/extending.md)")
    _, _, features = _gaussian_fn()
    with pytest.raises(ValueError, match=r"needs sample_shape="):
        amedlab.distill(fn, features=features, solver="amed", nfe=3, schedule=POLY, num_trajectories=8, batch_size=8)
    with pytest.raises(ValueError, match=r"features\(x, sigma\) returned \(2,\) for a batch of 2; accepted: a tensor \[N, F\]"):
        CallableDenoiser(fn, (2,), features=lambda x, sigma: x[:, 0])


def test_distill_on_a_plain_callable_with_features(example):
    g, fn, features = _gaussian_fn()
    settings = dict(solver="amed", nfe=3, schedule=POLY, num_trajectories=16, batch_size=8, epochs=1)
    predictor = amedlab.distill(fn, features=features, sample_shape=(2,), **settings)
    assert predictor.feature_dim == 1 and predictor.meta["updates"] == 2 * 2  # batches x intervals
    assert predictor.meta["model_name"] == "_gaussian_fn.<locals>.<lambda>"
    # the same functions wrapped again: the same identity, so the predictor samples on it
    model = CallableDenoiser(fn, (2,), features=features)
    assert predictor.meta["model_identity"] == model.identity()
    counted = counting(model)
    with torch.no_grad():
        x = make_solver("amed", predictor=predictor).sample(counted, _noise(8, dtype=torch.float32),
                                                            torch.tensor(predictor.meta["sigmas"]))
    assert x.shape == (8, 2) and torch.isfinite(x).all() and counted.calls == 3
    # another function is another model: its identity differs, and the predictor refuses it
    other = CallableDenoiser(lambda x, sigma: 0.9 * fn(x, sigma), (2,), features=features)
    assert other.identity() != model.identity()
    with pytest.raises(ValueError, match="this predictor was distilled for model"):
        make_solver("amed", predictor=predictor).sample(other, _noise(2, dtype=torch.float32),
                                                        torch.tensor(predictor.meta["sigmas"]))
    # a Denoiser with a feature hook is used as it is (no wrapper): the identity is its own
    assert amedlab.distill(g.float(), **settings).meta["model_identity"] == g.identity()


def test_train_learned_on_a_plain_callable(example):
    g, fn, _ = _gaussian_fn()
    noise = _noise(16, seed=1)
    target = g.reference(noise, 80.0, 0.002)
    base = make_sigmas("polynomial", 4, 0.002, 80.0, 7.0)
    for afs in (False, "mean"):  # AFS with the data mean needs the sample shape: taken from the noise
        params = amedlab.train_learned(fn, noise, target, base, afs=afs, batch_size=8, epochs=1, lr=0.01)
        assert params.meta["updates"] == 2 and params.meta["afs"] == afs
        with torch.no_grad():
            x = make_solver("learned", params=params).sample(fn, noise, params.sigmas())
        assert x.shape == noise.shape and torch.isfinite(x).all()


def test_the_plain_callable_example_runs(example):
    tmp_path, _ = example
    scope = runpy.run_path(str(tmp_path / "plain_callable.py"), run_name="__main__")
    assert scope["predictor"].feature_dim == 1 and scope["params"].meta["updates"] == 2 * 2
    assert torch.isfinite(scope["x"]).all()


# --- the command line: model._target_ and solver._target_ --------------------------------------------

def _cli(tmp_path, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "amedlab", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_cli_model_target_from_the_command_line(example):
    tmp_path, _ = example
    out = _cli(tmp_path, "stage=compare", "model=gaussian", "model.name=shifted_gaussian",
               "+model._target_=my_extensions.ShiftedGaussian", "model.mean=1.0", "compare.solvers=[euler,heun]",
               "compare.nfes=[5]", "compare.num_samples=16")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "run" / "compare.json").read_text())
    assert result["model"] == "shifted_gaussian" and set(result["results"]) == {"euler", "heun"}
    assert result["results"]["heun"]["5"]["nfe_counted"] == 5  # conf/solver/heun.yaml: AFS, 3 points
    assert result["results"]["euler"]["5"]["num_points"] == 6 and result["results"]["euler"]["5"]["rmse"] > 0


def test_cli_model_and_solver_targets_from_a_config_dir(example):
    tmp_path, _ = example
    out = _cli(tmp_path, "--config-dir", str(tmp_path / "myconf"), "stage=compare", "model=shifted_gaussian",
               "compare.solvers=[euler,heun,ralston]", "compare.nfes=[4,8]", "compare.num_samples=16")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "run" / "compare.json").read_text())["results"]
    assert set(result) == {"euler", "heun", "ralston"}
    assert result["ralston"]["8"]["nfe_counted"] == 8 and result["ralston"]["8"]["num_points"] == 5
    assert result["ralston"]["8"]["rmse"] < 0.5 * result["euler"]["8"]["rmse"]


def test_cli_refuses_a_target_that_is_not_a_denoiser(example):
    tmp_path, _ = example
    out = _cli(tmp_path, "stage=compare", "model=gaussian", "+model._target_=os.system", "compare.solvers=[euler]",
               "compare.nfes=[3]", "compare.num_samples=8")
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip()
    assert line.startswith("error: model._target_='os.system'") and "\n" not in line and "Traceback" not in line, line
