import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # 2-core CI boxes: one thread per process avoids oversubscription (much faster when shared)
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    # the suite's caches in one folder of its own (the default is the user's ~/.cache/amedlab): shared by
    # the tests, as a user's runs share theirs, and never mixed with a user's entries
    import os

    old = os.environ.get("AMEDLAB_CACHE")
    os.environ["AMEDLAB_CACHE"] = str(tmp_path_factory.mktemp("amedlab-cache"))
    yield
    if old is None:
        os.environ.pop("AMEDLAB_CACHE", None)
    else:
        os.environ["AMEDLAB_CACHE"] = old


@pytest.fixture
def compose_cfg():
    """Compose the real ``conf/`` with overrides, as the command line does (no run directory)."""
    from hydra import compose, initialize_config_dir

    from amedlab.specs import CONF_DIR

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def model_calls(monkeypatch):
    """Counts every denoiser evaluation of every model in the process."""
    from amedlab.models.base import Denoiser

    calls = {"n": 0}
    forward = Denoiser.forward

    def counted(self, x, sigma):
        calls["n"] += 1
        return forward(self, x, sigma)

    monkeypatch.setattr(Denoiser, "forward", counted)
    return calls
