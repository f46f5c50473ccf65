"""One local Ray cluster for the tests of this package (4 logical CPUs: rank-0 driver + workers +
a Serve replica), shut down after them unless someone else started it."""

from __future__ import annotations

import pytest


from tests.helpers import local_ray


@pytest.fixture(scope="package")
def ray_local():
    with local_ray():
        yield
