"""``omni_ray.devices``: host values onto a device without the host waiting for queued device work (``to_device``),
an engine thread's own CUDA stream (``own_stream``, the engines' ``cuda_stream``)."""

import numpy as np
import pytest
import torch

from omni_ray.devices import own_stream, to_device


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_host_value_kind_reaches_the_device():
    """Lists, numpy arrays, tensors over numpy memory (which cannot be pinned in place: the engines' step inputs
    made with ``torch.from_numpy`` failed so on the first GPU run) and plain CPU tensors, with and without a dtype."""
    dev = torch.device("cuda")
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    ref = torch.arange(12).reshape(3, 4)
    for x in (a.tolist(), a, torch.from_numpy(a), ref.clone(), torch.from_numpy(a)[:, 1:]):
        want = torch.as_tensor(x)
        for dtype in (None, torch.int32, torch.float32):
            t = to_device(x, dev, dtype)
            assert t.device.type == "cuda" and t.dtype == (dtype or want.dtype)
            assert torch.equal(t.cpu(), want.to(t.dtype))


def test_own_stream_is_nothing_off_cuda_and_engines_take_the_option():
    """Off CUDA ``own_stream`` changes nothing; an AR engine's thread and a DiT engine's worker with
    ``cuda_stream`` on generate as without it."""
    import asyncio

    from omni_ray.ar import AsyncLLM
    from omni_ray.ar.sampling_params import SamplingParams
    from omni_ray.config import AREngineConfig, DiTEngineConfig, ModelConfig
    from omni_ray.dit import AsyncDiTEngine, DiffusionParams

    assert own_stream(torch.device("cpu")) is None and own_stream(torch.device("cpu"), high_priority=True) is None
    with pytest.raises(ValueError, match="set cuda_stream: true"):
        DiTEngineConfig(model=ModelConfig(path="tiny:pixart"), cuda_stream_priority="high")
    with pytest.raises(ValueError, match="set cuda_stream: true"):
        AREngineConfig(model=ModelConfig(path="tiny:qwen3"), cuda_stream_sms=100)
    with pytest.raises(ValueError, match="set cuda_stream: true"):
        AREngineConfig(model=ModelConfig(path="tiny:qwen3"), cuda_stream_priority="high")
    with pytest.raises(ValueError, match="set cuda_stream: true"):
        DiTEngineConfig(model=ModelConfig(path="tiny:pixart"), cuda_stream_sms=36)
    assert DiTEngineConfig(model=ModelConfig(path="tiny:pixart")).cuda_stream_sms_side == "last"
    assert AREngineConfig(model=ModelConfig(path="tiny:qwen3")).cuda_stream_sms_side == "first"
    ar = AREngineConfig(model=ModelConfig(path="tiny:qwen3"), device="cpu", enforce_eager=True, core_process="off",
                        cuda_stream=True, cuda_stream_priority="high")
    dit = DiTEngineConfig(model=ModelConfig(path="tiny:pixart"), device="cpu", cuda_stream=True,
                          cuda_stream_priority="high")

    async def run():
        llm, img = AsyncLLM(ar), AsyncDiTEngine(dit)
        try:
            outs = [o async for o in llm.generate("a lighthouse", SamplingParams(max_tokens=3, ignore_eos=True), "s-1")]
            evs = [e async for e in img.generate("a fox", DiffusionParams(seed=0, num_inference_steps=2,
                                                                          height=64, width=64), "i-1")]
            return outs, evs
        finally:
            await img.shutdown()
            await llm.shutdown()

    outs, evs = asyncio.run(run())
    assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == 3 and evs[-1].kind == "done"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_own_stream_is_the_calling_threads_alone():
    """The thread that calls it works on its new stream from then on; other threads keep theirs."""
    import threading

    dev = torch.device("cuda")
    main = torch.cuda.current_stream(dev)
    got = {}

    def worker():
        s = own_stream(dev)
        got["same"] = torch.cuda.current_stream(dev) == s and s != main
        x = torch.arange(10, device=dev) * 2
        got["ok"] = torch.equal(x.cpu(), torch.arange(10) * 2)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert got == {"same": True, "ok": True} and torch.cuda.current_stream(dev) == main


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_high_priority_stream_has_the_devices_highest_priority():
    import threading

    got = {}

    def worker(high):
        got[high] = own_stream(torch.device("cuda"), high_priority=high).priority

    for high in (False, True):
        t = threading.Thread(target=worker, args=(high,))
        t.start()
        t.join()
    assert got[False] == 0 and got[True] < 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_green_stream_computes_and_captures():
    """``green_stream``: a green context's stream, adopted by a thread (``own_stream(stream=...)``, as an AR engine's
    core thread does); work on it (eager and a graph captured on it, as the AR runner's graphs are) gives the same
    results; asking for more SMs than the GPU has is refused."""
    import threading

    from omni_ray.devices import green_stream

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    with pytest.raises(ValueError, match="SMs"):
        green_stream(dev, sms + 8)
    got = {}

    def worker():
        green = green_stream(dev, sms // 2)
        s = own_stream(dev, stream=green)
        got["capture_on_it"] = s is green and torch.cuda.current_stream(dev) == green
        x = torch.arange(1000, device=dev, dtype=torch.float32)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            y = x * 2 + 1
        x.copy_(torch.arange(1000, device=dev, dtype=torch.float32) + 1)
        g.replay()
        got["ok"] = torch.equal(y.cpu(), (torch.arange(1000) + 1).float() * 2 + 1)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert got == {"capture_on_it": True, "ok": True}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_first_and_last_green_streams_run_on_disjoint_sms():
    """An AR engine's ``cuda_stream_sms: N`` (the first N SMs) and token2wav's ``cuda_stream_sms: total - N`` on the
    last SMs: one split of the GPU, so a kernel of many blocks on each stream runs on SMs (read from ``%smid``) the
    other never uses, and together they cover at most the GPU; a graph captured on a green stream stays there."""
    import triton
    import triton.language as tl

    from omni_ray.devices import green_stream

    @triton.jit
    def smid_kernel(out_ptr):
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(out_ptr + tl.program_id(0), sm)

    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).multi_processor_count
    first_n = total * 3 // 4
    first, last = green_stream(dev, first_n, "first"), green_stream(dev, total - first_n, "last")
    blocks = total * 16

    def sms_used(stream, graph=False):
        out = torch.full((blocks,), -1, device=dev, dtype=torch.int32)
        with torch.cuda.stream(stream):
            if graph:
                smid_kernel[(blocks,)](out)                   # compiled outside the capture
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=stream):
                    smid_kernel[(blocks,)](out)
                out.fill_(-1)
                g.replay()
            else:
                smid_kernel[(blocks,)](out)
        torch.cuda.synchronize()
        return set(out.cpu().tolist())

    a, b = sms_used(first), sms_used(last)
    assert -1 not in a and -1 not in b
    assert a.isdisjoint(b)
    assert len(a) <= first_n + 8 and len(b) <= total - first_n      # the driver may round the first group up
    assert len(a) + len(b) <= total
    assert sms_used(last, graph=True) <= b
    assert len(sms_used(torch.cuda.Stream())) > len(b)               # a normal stream spreads wider
