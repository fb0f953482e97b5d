import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test on one thread: the suite's models are tiny, and a thread pool only adds
    synchronisation, and much of it when the cores are busy with anything else."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
