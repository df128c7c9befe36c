"""One cache for every working folder (``cache_dir``), ``stage=cache``, and the CLI's conventions:
the renamed keys, the optional SLURM launcher, bash completion of the console script."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab.models.digits import make_digits_denoiser, save_denoiser
from amedlab.specs import CONF_DIR
from amedlab.specs.config import default_cache_dir
from amedlab.stages import cache as cache_stage
from amedlab.stages import evaluate as evaluate_stage

TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
BIN = Path(sys.executable).parent


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_the_default_is_amedlab_cache_else_the_user_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("AMEDLAB_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")
    assert _cfg().cache_dir == str(tmp_path / "mine")
    monkeypatch.delenv("AMEDLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "amedlab")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "amedlab")
    # the same folder whatever the working folder (it used to be ./.cache/amedlab, one per folder)
    monkeypatch.chdir(tmp_path)
    assert _cfg().cache_dir == str(tmp_path / "home" / ".cache" / "amedlab")


def test_a_second_working_folder_reuses_the_cache_and_the_first_use_is_announced(tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    model = make_digits_denoiser(TINY_NET, sigma_data=0.75).eval().requires_grad_(False)
    model_path = save_denoiser(model, tmp_path / "tiny.safetensors")
    monkeypatch.delenv("AMEDLAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    overrides = ["stage=evaluate", "model=digits_unet", f"model.path={model_path}", "solver=euler", "nfe=3",
                 "eval.seeds=0-15", "eval.batch_size=16", "eval.kid_subsets=2", "eval.ode_reference.nfe=8",
                 "eval.bootstrap.resamples=20"]
    results = []
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)  # run_dir() outside Hydra is the current directory
        caplog.clear()
        with caplog.at_level("INFO", logger="amedlab"):
            evaluate_stage.run(_cfg(*overrides))
        results.append((json.loads((tmp_path / folder / "metrics.json").read_text()), caplog.text))
    (first, first_log), (second, second_log) = results
    cache = tmp_path / "xdg" / "amedlab"
    assert f"caches go to {cache}" in first_log and "caches go to" not in second_log
    assert first["ode_reference"]["cached"] is False and second["ode_reference"]["cached"] is True
    assert first["ode_reference"]["cache_dir"] == second["ode_reference"]["cache_dir"] == str(cache / "ode_references")
    assert first["rmse"] == second["rmse"] and first["fid"] == second["fid"]
    assert not (tmp_path / "first" / ".cache").exists() and not (tmp_path / "second" / ".cache").exists()


def _fill(root: Path) -> None:
    for kind, files in {"ode_references": {"a.pt": 1000, "b.pt": 3000}, "real_stats": {"c.pt": 500},
                        "trajectories": {"d.pt": 2048}}.items():
        (root / kind).mkdir(parents=True)
        for name, size in files.items():
            (root / kind / name).write_bytes(b"x" * size)
    (root / "ode_references" / "a.pt.lock").write_bytes(b"")  # a lock is not an entry


def test_stage_cache_lists_size_and_entries_per_kind_and_clears_one_kind_or_all(tmp_path, capsys):
    root = tmp_path / "cache"
    _fill(root)
    listed = cache_stage.run(_cfg("stage=cache", f"cache_dir={root}"))["kinds"]
    assert listed == [{"kind": "ode_references", "entries": 2, "bytes": 4000},
                      {"kind": "real_stats", "entries": 1, "bytes": 500},
                      {"kind": "trajectories", "entries": 1, "bytes": 2048}]
    out = capsys.readouterr().out
    assert f"cache_dir: {root}" in out and "ode_references" in out and "3.9 KiB" in out and "total" in out
    gone = cache_stage.run(_cfg("stage=cache", f"cache_dir={root}", "cache.clear=ode_references"))["cleared"]
    assert [g["kind"] for g in gone] == ["ode_references"] and not (root / "ode_references").exists()
    assert (root / "real_stats" / "c.pt").is_file()
    cache_stage.run(_cfg("stage=cache", f"cache_dir={root}", "cache.clear=all"))
    assert cache_stage.run(_cfg("stage=cache", f"cache_dir={root}"))["kinds"] == []


def test_stage_cache_names_a_kind_that_is_not_there_before_removing_anything(tmp_path):
    from amedlab.errors import ConfigError

    root = tmp_path / "cache"
    _fill(root)
    with pytest.raises(ConfigError, match=r"cache.clear='predictors'.*accepted: all, ode_references, real_stats, trajectories"):
        cache_stage.run(_cfg("stage=cache", f"cache_dir={root}", "cache.clear=predictors"))
    with pytest.raises(ConfigError, match=r"cache.clear='\.\./x'"):
        cache_stage.run(_cfg("stage=cache", f"cache_dir={root}", "cache.clear=../x"))
    assert sorted(p.name for p in root.iterdir()) == ["ode_references", "real_stats", "trajectories"]


def _amedlab(*args, env=None):
    return subprocess.run([str(BIN / "amedlab"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("override, named", [
    ("eval.cache_dir=/tmp/x", "eval.cache_dir is no longer read: it was replaced by cache_dir"),
    ("+distill.cache_dir=/tmp/x", "distill.cache_dir is no longer read: it was replaced by cache_dir"),
])
def test_the_old_cache_keys_are_named_with_their_replacement(tmp_path, override, named):
    out = _amedlab("stage=cache", override, env={"AMEDLAB_CACHE": str(tmp_path)})
    assert out.returncode == 2 and out.stderr.startswith(f"error: {named}"), out.stderr
    assert "Traceback" not in out.stderr


def test_the_slurm_launcher_without_its_extra_is_one_line_naming_the_extra(monkeypatch):
    from hydra.errors import MissingConfigException

    from amedlab import cli

    err = MissingConfigException("In 'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'.",
                                 missing_cfg_file="hydra/launcher/submitit_slurm")
    monkeypatch.setattr(cli, "_has_module", lambda name: False)
    assert cli.user_error_message(err) == ("error: hydra/launcher=slurm needs Hydra's submitit launcher, an optional "
                                           "extra: pip install 'amed-lab[slurm]' (or hydra-submitit-launcher)")
    monkeypatch.setattr(cli, "_has_module", lambda name: True)  # installed: Hydra's own message stays
    assert "amed-lab[slurm]" not in cli.user_error_message(err)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_of_the_console_script_completes_groups_and_options(tmp_path):
    script = _amedlab("-sc", "install=bash").stdout
    assert "complete" in script and "amedlab" in script
    shell = (f'{script}\nCOMP_LINE="amedlab solver=ipn"; COMP_POINT=${{#COMP_LINE}}; COMP_CWORD=1\n'
             'hydra_bash_completion; printf "%s\\n" "${COMPREPLY[@]}"\n')
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert out.stdout.split() == ["solver=ipndm"], (out.stdout, out.stderr)
