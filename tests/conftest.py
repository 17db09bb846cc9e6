import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small tensors: on the shared 2-core test machine a second OpenMP thread only adds waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
