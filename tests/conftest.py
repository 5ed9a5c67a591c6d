import os

import pytest

# On small shared CPUs, OpenMP threads that spin-wait for work slow every other process (data
# workers, the other test worker) by an order of magnitude; passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def two_threads():
    """Two intra-op threads for a module (the parity tolerances were set at 2 threads)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)
