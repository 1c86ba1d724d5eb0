import os
import warnings

import pytest

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Small test networks gain nothing from intra-op threads; on 2 shared cores they thrash."""
    import torch

    torch.set_num_threads(1)
