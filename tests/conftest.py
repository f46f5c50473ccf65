import os

import pytest
import torch

# keep CI's 2 cores for one torch process each; tests must not oversubscribe
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

has_cuda = torch.cuda.is_available()


@pytest.fixture(scope="module")
def ray_up():
    """A local Ray cluster for the module (shared if one is already up)."""
    from tests.helpers import local_ray

    with local_ray():
        yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
