"""``omni_ray.devices.to_device``: host values onto a device without the host waiting for queued device work."""

import numpy as np
import pytest
import torch

from omni_ray.devices import to_device


def test_values_and_dtypes_on_the_cpu():
    cpu = torch.device("cpu")
    assert torch.equal(to_device([1, 2, 3], cpu, torch.int32), torch.tensor([1, 2, 3], dtype=torch.int32))
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    t = to_device(a, torch.device("cpu"))
    assert t.dtype == torch.int64 and torch.equal(t, torch.from_numpy(a))
    x = torch.randn(4)
    assert torch.equal(to_device(x, torch.device("cpu"), torch.float64), x.double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_copy_does_not_wait_for_queued_work():
    """With a long kernel queued, the copy returns while the stream is still busy (a pageable copy waits for it
    first); the values arrive in stream order."""
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)                  # ~1 s of GPU time queued ahead of the copy
    t = to_device(np.arange(1000, dtype=np.int64), dev, torch.int32)
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy
    assert t.device.type == "cuda" and t.dtype == torch.int32
    assert torch.equal(t.cpu(), torch.arange(1000, dtype=torch.int32))
