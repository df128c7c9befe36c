import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # 2-core CI boxes: one thread per process avoids oversubscription (much faster when shared)
    torch.set_num_threads(1)
    yield
