"""A group of ranks for one model: rank 0 in this process, ranks 1..N-1 as Ray actors.

    group = WorkerGroup(2, functools.partial(make_shard, cfg))   # make_shard(ctx: RankContext) -> obj
    group.call("load", path)          # every rank runs obj.load(path); returns rank 0's result
    group.post([1, 2, 3])             # workers run obj.handle_post(np.array([1, 2, 3])); no pickling
    group.check_health()              # EngineError if a worker died
    group.shutdown()

The workers sit in a loop receiving commands over a gloo group (``cpu_group``) by collective
broadcast from rank 0: a fixed header of ``HEADER`` int64s (opcode, count, values), followed for
pickled calls by the pickled bytes. A step therefore costs no Ray round trip; ``post`` is the
hot-path form (a 512-byte header, nothing pickled). Tensors go over ``group`` (NCCL on GPU,
gloo on CPU).

Placement: all worker actors live in one placement group (one bundle per rank). Inside a Ray
Serve replica started with ``placement_group_bundles``, pass the replica's placement group
(``ray.util.get_current_placement_group()``): the replica is rank 0 in bundle 0 and the
workers take bundles 1..N-1. Without one, the group makes its own (on GPU with an extra bundle
0 that reserves this process's GPU, so Ray never hands it to a worker).

Failure: every worker runs one long actor call; a watchdog thread waits on those ObjectRefs.
When one ends (the actor died or its loop raised), the group is marked failed, an NCCL group is
aborted (so kernels waiting on the dead peer return), failure callbacks run, and every later
call raises ``EngineError`` naming the rank. A worker that hits an error tears its process
groups down, so a peer blocked in a gloo collective gets an error at once; collectives also
carry ``timeout_s``. Nothing waits forever.

One live group per process (torch.distributed has one default group per process); a failed
group is shut down automatically when the next one is created.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from omni_ray.devices import resolve_device
from omni_ray.errors import ConfigError, EngineError, OmniError, ResourceError

log = logging.getLogger(__name__)

HEADER = 64                       # int64s per command header on cpu_group
MAX_POST = HEADER - 2             # values one ``post`` carries
OP_STOP, OP_CALL, OP_POST = 0, 1, 2
IDLE_TIMEOUT = timedelta(days=365)   # cpu_group: workers wait for the next command indefinitely
_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_SYMM_MEM_", "NVSHMEM_", "GLOO_", "CUDA_DEVICE_MAX_CONNECTIONS",
                 "OMNI_RAY_")


@dataclass
class RankContext:
    """What each rank's object is built with."""
    rank: int
    size: int
    device: torch.device
    group: Any                    # torch.distributed group for tensors (NCCL on GPU, gloo on CPU)
    cpu_group: Any                # gloo group for small commands


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend: nccl needs CUDA devices")
    return backend


# ----------------------------------------------------------------------------- wire protocol
def _send_header(cpu_group, buf: torch.Tensor, op: int, values: Sequence[int] = ()) -> None:
    n = len(values)
    if n > MAX_POST:
        raise ValueError(f"a header carries at most {MAX_POST} values, got {n}")
    h = buf.numpy()                           # a view: filling it costs a microsecond, not a tensor op
    h[0], h[1] = op, n
    h[2:2 + n] = values
    dist.broadcast(buf, src=0, group=cpu_group)


def _send_bytes(cpu_group, data: bytes) -> None:
    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=cpu_group)


def _recv_bytes(cpu_group, n: int) -> bytes:
    t = torch.empty(n, dtype=torch.uint8)
    dist.broadcast(t, src=0, group=cpu_group)
    return t.numpy().tobytes()


def _init_dist(store, rank: int, size: int, backend: str, timeout_s: float):
    """This process's side of the group: the default process group (tensors) + a gloo group."""
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return dist.group.WORLD, cpu_group


def _destroy_dist(abort: bool = False) -> None:
    if not dist.is_initialized():
        return
    if abort:
        _abort_dist()
    try:
        dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - best effort on a broken group
        log.debug("destroy_process_group: %r", err)


def _abort_dist() -> None:
    """Abort NCCL communicators so kernels stuck on a dead peer return (no-op for gloo)."""
    if not dist.is_initialized() or dist.get_backend() != "nccl":
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None:
            abort()
        else:
            dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001
        log.warning("aborting the NCCL group failed: %r", err)


# ----------------------------------------------------------------------------- worker side
class _RankWorker:
    """A Ray actor holding one rank (1..size-1). ``run`` is one long call: join, build, loop."""

    def __init__(self, rank: int, size: int, env: dict[str, str], num_threads: int):
        os.environ.update(env)
        self.rank, self.size = rank, size
        if num_threads > 0:
            torch.set_num_threads(num_threads)

    def run(self, host: str, port: int, backend: str, device_type: str, make_rank: Callable,
            timeout_s: float) -> str:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.TCPStore(host, port, self.size, False, timedelta(seconds=timeout_s))
        store.set(f"join/{self.rank}", "1")
        try:
            group, cpu_group = _init_dist(store, self.rank, self.size, backend, timeout_s)
            ctx = RankContext(self.rank, self.size, device, group, cpu_group)
            obj = make_rank(ctx)
            store.set(f"ready/{self.rank}", str(os.getpid()))
            self._loop(obj, cpu_group)
        except BaseException:
            _destroy_dist(abort=True)  # peers blocked on us get an error now, not at a timeout
            raise
        _destroy_dist()
        return "stopped"

    def _loop(self, obj, cpu_group) -> None:
        hdr = torch.zeros(HEADER, dtype=torch.int64)
        while True:
            dist.broadcast(hdr, src=0, group=cpu_group)
            op, n = int(hdr[0]), int(hdr[1])
            if op == OP_STOP:
                return
            if op == OP_POST:
                obj.handle_post(hdr[2:2 + n].numpy())
            elif op == OP_CALL:
                method, args, kwargs, gather = pickle.loads(_recv_bytes(cpu_group, int(hdr[2])))
                result = getattr(obj, method)(*args, **kwargs)
                if gather:
                    dist.all_gather_object([None] * self.size, result, group=cpu_group)
            else:
                raise EngineError(f"rank {self.rank}: unknown opcode {op}")


class _GpuReservation:
    """Holds bundle 0's GPU for a rank 0 that is a plain driver process (not a Ray actor)."""

    def gpu_ids(self) -> list:
        import ray
        return [str(i) for i in ray.get_gpu_ids()]


# ----------------------------------------------------------------------------- rank 0 side
@dataclass
class _State:
    """Everything the watchdog and the finalizer need (they must not keep the group alive)."""
    name: str
    size: int
    backend: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    actors: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    pg: Any = None
    owns_pg: bool = False
    reservation: Any = None
    store: Any = None
    cpu_group: Any = None
    dist_ready: bool = False
    stopping: bool = False
    error: EngineError | None = None
    callbacks: list = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    header: torch.Tensor = field(default_factory=lambda: torch.zeros(HEADER, dtype=torch.int64))

    def rank_of(self, ref) -> int:
        return self.refs.index(ref) + 1

    def fail(self, err: EngineError) -> EngineError:
        """Record the first failure, abort NCCL, tell the callbacks. Returns the recorded error."""
        with _FAIL_LOCK:
            if self.error is not None:
                return self.error
            self.error = err
        log.error("%s", err.message)
        if self.dist_ready:
            _abort_dist()
        for cb in list(self.callbacks):
            try:
                cb(err)
            except Exception:  # noqa: BLE001
                log.exception("failure callback raised")
        return err

    def describe_exit(self, ref) -> EngineError:
        import ray
        rank = self.rank_of(ref)
        try:
            what = f"its loop returned {ray.get(ref, timeout=1)!r}"
        except Exception as err:  # noqa: BLE001
            what = _short(getattr(err, "cause", None) or err)
        return EngineError(f"{self.name} group: worker rank {rank} of {self.size} is gone ({what})")

    def poll(self, timeout: float) -> EngineError | None:
        """Wait up to ``timeout`` for a worker's loop to end; returns the failure, if any."""
        import ray
        if self.error is not None or not self.refs:
            return self.error
        ready, _ = ray.wait(self.refs, num_returns=1, timeout=timeout)
        if ready and not self.stopping:
            return self.fail(self.describe_exit(ready[0]))
        return self.error


_FAIL_LOCK = threading.Lock()
_CURRENT: weakref.ref | None = None     # the live group of this process


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def _watchdog(state: _State, period: float) -> None:
    while not state.stop_event.is_set():
        try:
            if state.poll(period) is not None:
                return
        except Exception as err:  # noqa: BLE001 - Ray shut down under us
            if not state.stopping:
                state.fail(EngineError(f"{state.name} group watchdog lost Ray: {_short(err)}"))
            return


def _cleanup(state: _State) -> None:
    """Shut the group down (idempotent; also the finalizer of a group that was dropped)."""
    import ray
    global _CURRENT
    state.stopping = True
    state.stop_event.set()
    healthy = state.error is None and state.dist_ready
    if healthy and state.lock.acquire(timeout=10):
        try:
            _send_header(state.cpu_group, state.header, OP_STOP)
            if ray.is_initialized():
                ray.wait(state.refs, num_returns=len(state.refs), timeout=10)
        except Exception as err:  # noqa: BLE001
            log.debug("stopping workers: %r", err)
        finally:
            state.lock.release()
    if state.dist_ready:
        _destroy_dist(abort=not healthy)
        state.dist_ready = False
    if ray.is_initialized():
        for a in state.actors + ([state.reservation] if state.reservation is not None else []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if state.owns_pg and state.pg is not None:
            try:
                ray.util.remove_placement_group(state.pg)
            except Exception:  # noqa: BLE001
                pass
    state.actors, state.refs, state.reservation, state.pg, state.store, state.cpu_group = [], [], None, None, None, None
    if _CURRENT is not None and _CURRENT() is state:
        _CURRENT = None


class WorkerGroup:
    """Rank 0 = this process; ranks 1..size-1 = Ray actors in one placement group."""

    def __init__(self, size: int, make_rank: Callable[[RankContext], Any], *, device: str = "auto",
                 backend: str = "auto", strategy: str = "STRICT_PACK", placement_group=None,
                 bundle_offset: int | None = None, timeout_s: float = 60, name: str = "worker",
                 init_timeout_s: float | None = None, watchdog_period_s: float = 0.5):
        if size < 1:
            raise ConfigError(f"a worker group needs at least one rank, got {size}")
        self.size = size
        self.device = resolve_device(device)
        self.backend = resolve_backend(backend, self.device)
        self.timeout_s = timeout_s
        self.init_timeout_s = init_timeout_s or max(600.0, timeout_s)
        self._state = _State(name, size, self.backend)
        self._finalize = weakref.finalize(self, _cleanup, self._state)
        self.rank0: Any = None
        self.worker_pids: list[int] = []          # ranks 1..size-1 (same node or not)
        try:
            self._start(make_rank, strategy, placement_group, bundle_offset, watchdog_period_s)
        except Exception as err:
            failure = self._state.error
            self.shutdown()
            if isinstance(err, OmniError):
                raise
            raise (failure or EngineError(f"{name} group failed to start: {_short(err)}")) from err
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ start
    def _start(self, make_rank, strategy, placement_group, bundle_offset, watchdog_period_s) -> None:
        import ray
        global _CURRENT
        st = self._state
        if not ray.is_initialized():
            ray.init(log_to_driver=False, include_dashboard=False)
        self._claim_process()
        _CURRENT = weakref.ref(st)
        if self.size > 1:
            pg, offset = self._placement(placement_group, bundle_offset, strategy)
            host = ray.util.get_node_ip_address()
            st.store = dist.TCPStore(host, 0, self.size, True, timedelta(seconds=self.timeout_s),
                                     wait_for_workers=False)
            self._spawn(pg, offset, host, st.store.port, make_rank)
            threading.Thread(target=_watchdog, args=(st, watchdog_period_s), daemon=True,
                             name=f"omni-{st.name}-watchdog").start()
            self._wait_keys("join", "join the group")
        else:
            st.store = dist.HashStore()
        if self.device.type == "cuda":
            if self.device.index is None:                                # a Serve replica: its one GPU
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        group, cpu_group = _init_dist(st.store, 0, self.size, self.backend, self.timeout_s)
        st.dist_ready = True
        st.cpu_group = cpu_group
        self.group, self.cpu_group = group, cpu_group
        self.context = RankContext(0, self.size, self.device, group, cpu_group)
        self.rank0 = make_rank(self.context)
        if self.size > 1:
            self._wait_keys("ready", "build its rank")
            self.worker_pids = [int(st.store.get(f"ready/{r}")) for r in range(1, self.size)]
        self._raise_if_failed()
        log.info("%s group of %d ranks up (%s, %s)", st.name, self.size, self.device, self.backend)

    def _claim_process(self) -> None:
        """Only one group per process: shut down a failed or dropped one; refuse a live one."""
        prev = _CURRENT() if _CURRENT is not None else None
        if prev is not None and prev.dist_ready and prev.error is None:
            gc.collect()                     # a dropped group in a reference cycle: run its finalizer now
        if prev is not None and prev.dist_ready:
            if prev.error is None:
                raise ConfigError(f"this process already runs a live {prev.name} worker group; shut it down "
                                  "first (torch.distributed allows one default group per process)")
            _cleanup(prev)
        if dist.is_initialized():
            raise ConfigError("torch.distributed is already initialised in this process by someone else; "
                              "a WorkerGroup needs to own it")

    def _placement(self, placement_group, bundle_offset, strategy):
        """(placement group, first worker bundle). Creates one when none is given."""
        import ray
        from ray.util.placement_group import placement_group as make_pg
        st = self._state
        if placement_group is not None:
            n = len(placement_group.bundle_specs)
            offset = 1 if bundle_offset is None else bundle_offset
            if offset + self.size - 1 > n:
                raise ConfigError(f"placement group has {n} bundles; {self.size - 1} workers from bundle "
                                  f"{offset} do not fit")
            st.pg = placement_group
            return placement_group, offset
        gpu = self.device.type == "cuda"
        bundle = {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": 1.0}
        bundles = [dict(bundle) for _ in range(self.size - 1)]
        if gpu:   # bundle 0 reserves this process's GPU, on this node
            bundles.insert(0, {"GPU": 1.0, f"node:{ray.util.get_node_ip_address()}": 0.001})
        st.pg, st.owns_pg = make_pg(bundles, strategy=strategy), True
        try:
            ray.get(st.pg.ready(), timeout=self.timeout_s)
        except Exception as err:
            raise ResourceError(f"{st.name} group: placement group {bundles} ({strategy}) could not be "
                                f"scheduled within {self.timeout_s:.0f}s: {_short(err)}") from err
        if gpu:
            self._use_reserved_gpu()
        return st.pg, 1 if gpu else 0

    def _use_reserved_gpu(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        st = self._state
        cls = ray.remote(num_cpus=0, num_gpus=1)(_GpuReservation)
        st.reservation = cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            st.pg, placement_group_bundle_index=0)).remote()
        gpu_id = ray.get(st.reservation.gpu_ids.remote(), timeout=self.timeout_s)[0]
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        index = visible.index(gpu_id) if visible else int(gpu_id)
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)

    def _spawn(self, pg, offset: int, host: str, port: int, make_rank) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        st = self._state
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        for r in range(1, self.size):
            idx = offset + r - 1
            spec = pg.bundle_specs[idx]
            gpus = 1.0 if self.device.type == "cuda" else 0.0
            if spec.get("GPU", 0.0) < gpus:
                raise ConfigError(f"bundle {idx} of the placement group has no GPU for worker rank {r}")
            cpus = min(1.0, spec.get("CPU", 0.0))
            actor = ray.remote(_RankWorker).options(
                num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=1,
                name=None, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=idx, placement_group_capture_child_tasks=False),
            ).remote(r, self.size, env, max(1, int(cpus)) if self.device.type == "cpu" else 0)
            st.actors.append(actor)
            st.refs.append(actor.run.remote(host, port, self.backend, self.device.type, make_rank, self.timeout_s))

    def _wait_keys(self, prefix: str, what: str) -> None:
        """Wait until every worker set ``prefix/<rank>`` in the store, failing fast if one dies."""
        st = self._state
        keys = [f"{prefix}/{r}" for r in range(1, self.size)]
        deadline = time.monotonic() + self.init_timeout_s
        while not st.store.check(keys):
            err = st.poll(0.05)
            if err is not None:
                raise err
            if time.monotonic() > deadline:
                raise st.fail(EngineError(f"{st.name} workers did not {what} within {self.init_timeout_s:.0f}s"))

    # ------------------------------------------------------------------ commands
    @property
    def actors(self) -> list:
        return list(self._state.actors)

    @property
    def lock(self) -> threading.RLock:
        """Held around one command; hold it yourself to keep a command and its collectives together."""
        return self._state.lock

    @property
    def failed(self) -> bool:
        return self._state.error is not None

    def call(self, method: str, *args, **kwargs):
        """Every rank runs ``getattr(obj, method)(*args, **kwargs)``; returns rank 0's result.
        An exception on any rank fails the group (the ranks may be out of step): validate first."""
        return self._call(method, args, kwargs, gather=False)

    def call_all(self, method: str, *args, **kwargs) -> list:
        """Like ``call``, returning every rank's result (gathered over cpu_group; small results only)."""
        return self._call(method, args, kwargs, gather=True)

    def _call(self, method: str, args, kwargs, gather: bool):
        with self.lock:
            self._raise_if_failed()
            try:
                if self.size > 1:
                    data = pickle.dumps((method, args, kwargs, gather), protocol=pickle.HIGHEST_PROTOCOL)
                    _send_header(self.cpu_group, self._state.header, OP_CALL, [len(data)])
                    _send_bytes(self.cpu_group, data)
                result = getattr(self.rank0, method)(*args, **kwargs)
                if gather and self.size > 1:
                    out = [None] * self.size
                    dist.all_gather_object(out, result, group=self.cpu_group)
                    return out
                return [result] if gather else result
            except Exception as err:
                raise self.failure(err) from err

    def post(self, values: Sequence[int]) -> None:
        """Send up to ``MAX_POST`` ints to the workers without pickling; each runs
        ``obj.handle_post(np.ndarray[int64])``. Rank 0 does its own part itself."""
        if len(values) > MAX_POST:
            raise ValueError(f"post carries at most {MAX_POST} values, got {len(values)}")
        if self.size == 1:
            return
        with self.lock:
            self._raise_if_failed()
            try:
                _send_header(self.cpu_group, self._state.header, OP_POST, values)
            except Exception as err:
                raise self.failure(err) from err

    # ------------------------------------------------------------------ health
    def failure(self, err: BaseException) -> EngineError:
        """Turn an error seen on rank 0 (a collective that raised) into the group's EngineError,
        waiting briefly for Ray to say which worker went away. Marks the group failed."""
        st = self._state
        if isinstance(err, EngineError) and st.error is err:
            return err
        deadline = time.monotonic() + 5.0
        while st.error is None and st.refs and time.monotonic() < deadline:
            try:
                st.poll(0.1)
            except Exception:  # noqa: BLE001
                break
        return st.error or st.fail(EngineError(f"{st.name} group failed on rank 0: {_short(err)}"))

    def check_health(self) -> None:
        """Raises EngineError if a worker died (or the group failed); cheap."""
        st = self._state
        if st.error is None and st.refs and not st.stopping:
            try:
                st.poll(0)
            except Exception as err:  # noqa: BLE001
                st.fail(EngineError(f"{st.name} group cannot reach Ray: {_short(err)}"))
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        st = self._state
        if st.error is not None:
            raise st.error
        if not st.dist_ready and self.rank0 is not None:
            raise EngineError(f"{st.name} group is shut down")

    def add_failure_callback(self, fn: Callable[[EngineError], None]) -> None:
        """``fn(err)`` runs once, from the thread that noticed, when the group fails."""
        self._state.callbacks.append(fn)
        if self._state.error is not None:
            fn(self._state.error)

    def shutdown(self) -> None:
        """Idempotent: stops the workers, destroys the process groups, kills the actors, removes
        the placement group this group created."""
        self._finalize()

