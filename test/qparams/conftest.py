import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many small elementwise ops; on a shared 2-core CPU, two OpenMP threads
    contend with other processes and make each op ~20x slower, so use one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
