import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small tensors: on the shared 2-core test machine a second OpenMP thread only adds waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_compiler():
    """Dynamo's caches and the lowbit backend's weight cache and reports, empty before and after a test."""
    import lowbit_compile as lb

    torch._dynamo.reset()
    lb.reset()
    yield
    torch._dynamo.reset()
    lb.reset()
