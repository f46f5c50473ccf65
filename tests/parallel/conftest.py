"""One local Ray cluster for the tests of this package (4 logical CPUs: rank-0 driver + workers +
a Serve replica), shut down after them unless someone else started it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
