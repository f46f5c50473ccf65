import os

import pytest
import torch

# keep CI's 2 cores for one torch process each; tests must not oversubscribe
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

has_cuda = torch.cuda.is_available()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session (started by the first test that needs one, shut down
    at the end; shared if one is up already): starting a cluster per module costs ~10 s each on 2 cores.
    Yields its GCS address. Tests leave it clean: they stop the actors, groups and apps they start."""
    from tests.helpers import local_ray

    with local_ray() as address:
        yield address


@pytest.fixture(scope="module")
def ray_up(ray_session):
    """The session's local Ray cluster, for a module's tests."""
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
