"""The engine core behind ``AsyncLLM``: what steps the engine, in a thread or in its own process.

    core = ThreadCore(cfg) | ProcessCore(cfg)
    core.start(deliver, fail)          # deliver([(request_id, item), ...]) / fail(err): on the event loop
    core.add(request_id, prompt, params, stream_text)
    core.abort(request_id)

Either way one loop owns the ``LLMEngine``: it takes new requests and aborts, steps, and turns
what changed into per-request items (a ``RequestOutput``, the hidden states of an encode request,
or the ``InvalidRequestError`` of a request it refused), handed over once per step. Streams
without stop strings carry token ids only: their text is decoded on the caller's side
(``AsyncLLM``), off the loop that feeds the GPU.

``ProcessCore`` runs that loop in a child process (``python -m omni_ray.ar.engine.engine_core``, over a
socket pair), as vLLM's EngineCore does: the serving process's event loop (HTTP, Serve messages,
per-token streaming) then never competes with the engine's host work for one GIL. ``ThreadCore``
keeps the engine in-process (CPU, tensor parallelism, whose Ray worker actors rank 0 drives).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
import torch

from omni_ray.ar.engine.detokenizer import stream_safe_len
from omni_ray.ar.sequence import Sequence
from omni_ray.capture_lock import step_lock
from omni_ray.config import AREngineConfig
from omni_ray.devices import own_stream, resolve_device
from omni_ray.errors import EngineError, InvalidRequestError, OmniError
from omni_ray.heap import freeze_startup_heap

log = logging.getLogger(__name__)
SLOW_STEP_S = 0.2          # a step slower than this is logged (a compile, an allocation, a stuck host)


@dataclass
class RequestOutput:
    request_id: str
    text: str                       # new text since the previous output
    token_ids: list[int]            # new tokens since the previous output
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None       # "stop" | "length" | "abort" | None
    num_prompt_tokens: int
    num_output_tokens: int
    context_ids: list[int] | None = None   # first output of a stream whose text the caller decodes: the prompt's tail
    top_logprobs: list[list[tuple[int, float]]] | None = None   # params.logprobs > 0: each new token's top k
    # prompt_logprobs set, first output only: the prompt's ids, each token's (logprob, top k) (the first: None)
    prompt_logprobs: tuple[list[int], list] | None = None
    # params.return_hidden_states: the final hidden states [n, H] float32 of the positions fed since the previous
    # output (the prompt's, then one per generated token but the last); numpy from the core, a CPU tensor
    # from AsyncLLM. With the first rows of a prompt that had M-RoPE positions (media): those [3, L] and the delta
    hidden_states: np.ndarray | torch.Tensor | None = None
    prompt_positions: np.ndarray | torch.Tensor | None = None
    rope_delta: int | None = None


class CoreLoop:
    """Requests in, per-request items out, around one ``LLMEngine`` (runs on one thread only)."""

    def __init__(self, engine):
        self.engine = engine

    def apply(self, adds: list[tuple], aborts: list[str]) -> list[tuple]:
        items = []
        for rid, prompt, params, stream_text in adds:
            try:
                seq = self.engine.make_sequence(prompt, params, rid)      # validates
            except OmniError as err:
                items.append((rid, err))
                continue
            seq.stream_text = stream_text
            seq.sent_tokens = seq.sent_chars = 0
            self.engine.add_sequence(seq)
        for rid in aborts:
            seq = self.engine.seqs.get(rid)
            if self.engine.abort(rid) and seq is not None:
                items.append((rid, RequestOutput(rid, "", [], None, True, "abort", seq.num_prompt_tokens,
                                                 seq.num_output_tokens)))
        return items

    def step(self) -> list[tuple]:
        t0 = time.perf_counter()
        with step_lock():                # beside other engines' steps, never during another thread's graph capture
            t1 = time.perf_counter()
            seqs = self.engine.step_seqs()
        out = [x for seq in seqs if (x := self.output(seq)) is not None]
        dt = time.perf_counter() - t0
        if dt > SLOW_STEP_S:
            seqs, decodes, tokens, k = getattr(self.engine, "last_step", (0, 0, 0, 0))
            log.warning("slow engine step: %.0f ms (%d sequences, %d of them decodes, %d tokens, %d forwards; "
                        "%.0f ms of it waiting for another thread's graph capture)",
                        1000 * dt, seqs, decodes, tokens, k, 1000 * (t1 - t0))
        return out

    def output(self, seq: Sequence):
        """(request id, what its caller gets) for a sequence that changed in the last step, or None."""
        if seq.error is not None:                         # its step failed: the caller gets the error
            return (seq.request_id, seq.error)
        if seq.is_encode:
            return (seq.request_id, np.concatenate([h.numpy() for h in seq.hidden_chunks])) if seq.is_finished else None
        new_ids = seq.token_ids[seq.num_prompt_tokens + seq.sent_tokens:]     # only the new tail, copied
        context = None
        if seq.stream_text and not seq.params.stop:
            # the caller decodes the text (AsyncLLM, StreamText): the engine loop only steps
            text = ""
            if seq.sent_tokens == 0:
                context = seq.token_ids[seq.prefix_offset:seq.read_offset]
        else:                                             # stop strings: text decoded as the engine checks them
            safe = stream_safe_len(seq, seq.params.stop)
            text = seq.output_text[seq.sent_chars:safe]
            seq.sent_chars = max(seq.sent_chars, safe)
        if not new_ids and not text and not seq.is_finished and not seq.hidden_rows:
            return None
        p = seq.params
        lp = seq.logprobs[seq.sent_tokens:] if p.logprobs is not None else None
        top = seq.top_logprobs[seq.sent_tokens:] if p.logprobs else None
        prompt_lp = None
        if p.prompt_logprobs is not None and not getattr(seq, "sent_prompt_logprobs", False):
            seq.sent_prompt_logprobs = True
            prompt_lp = (seq.token_ids[:seq.num_prompt_tokens], list(seq.prompt_logprobs))
        seq.sent_tokens += len(new_ids)
        out = RequestOutput(seq.request_id, text, new_ids, lp, seq.is_finished, seq.finish_reason,
                            seq.num_prompt_tokens, seq.num_output_tokens, context, top, prompt_lp)
        if seq.wants_hidden:          # numpy: pickled as one buffer across the child process's pipe
            h = seq.take_hidden_output()
            out.hidden_states = h["hidden_states"].numpy() if h["hidden_states"] is not None else None
            out.prompt_positions = h["prompt_positions"].numpy() if h["prompt_positions"] is not None else None
            out.rope_delta = h["rope_delta"]
        return (seq.request_id, out)


# ============================================================================ in-process
class ThreadCore:
    """The engine in this process, stepped by one thread; results go to the loop once per step."""

    def __init__(self, config: AREngineConfig):
        from omni_ray.ar.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(config)
        self.tokenizer, self.layout = self.engine.tokenizer, self.engine.layout
        self.model_name, self.max_model_len = self.engine.model_name, self.engine.max_model_len
        self._core = CoreLoop(self.engine)
        self._lock = threading.Lock()                 # guards the two lists (never held over a step)
        self._adds: list[tuple] = []
        self._aborts: list[str] = []
        self._work = threading.Event()
        self.engine.input_event = self._work          # streamed input rows wake the loop as requests do
        self._stop = False
        self._thread: threading.Thread | None = None
        self._target = None                           # (loop, deliver, fail) once started
        self._turn: list[tuple] = []                  # adds of the current event-loop turn (loop thread only)

    def start(self, loop: asyncio.AbstractEventLoop, deliver, fail) -> None:
        """Hand results to ``loop`` from now on (called again when the caller's loop changes)."""
        self._target = (loop, deliver, fail)
        if self._thread is None:
            # a tensor-parallel worker that dies fails requests at once, even mid-step
            self.engine.add_failure_callback(lambda err: self._call(2, err))
            self._thread = threading.Thread(target=self._run, name="omni-ar-engine", daemon=True)
            self._thread.start()

    def _call(self, which: int, arg) -> None:
        """``deliver(arg)`` (1) or ``fail(arg)`` (2) on the caller's loop."""
        loop = self._target[0]
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._target[which], arg)

    def add(self, rid: str, prompt, params, stream_text: bool) -> None:
        """Queued for the engine thread at the end of this event-loop turn, with the turn's other adds
        (as ProcessCore sends them): requests made together (a prompt and its negative prompt, gathered)
        start in one step even while the engine is busy."""
        item = (rid, prompt, params, stream_text)
        loop = self._loop_here()
        if loop is None:
            with self._lock:
                self._adds.append(item)
            self._work.set()
            return
        self._turn.append(item)
        if len(self._turn) == 1:
            loop.call_soon(self._end_turn)

    def _loop_here(self):
        """The caller's loop when this is called on it (not closed), else None."""
        loop = self._target[0] if self._target is not None else None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        return loop if loop is not None and running is loop and not loop.is_closed() else None

    def _end_turn(self) -> None:
        turn, self._turn = self._turn, []
        if turn:
            with self._lock:
                self._adds += turn
            self._work.set()

    def abort(self, rid: str) -> None:
        if self._loop_here() is not None:
            if any(item[0] == rid for item in self._turn):         # not handed over yet: never reaches the engine
                self._turn = [item for item in self._turn if item[0] != rid]
                return
        elif self._target is not None and not self._target[0].is_closed():
            # another thread (a Serve worker): after the loop's pending turn, so never before its add
            self._target[0].call_soon_threadsafe(self._abort_now, rid)
            return
        self._abort_now(rid)

    def _abort_now(self, rid: str) -> None:
        with self._lock:
            self._aborts.append(rid)
        self._work.set()

    def stats(self) -> dict:
        return self.engine.engine_stats()

    def describe(self):
        describe = getattr(self.engine.runner, "describe", None)      # tensor parallel: the ranks
        return describe() if describe is not None else None

    def check_health(self) -> None:
        self.engine.check_health()

    def shutdown(self) -> None:
        self._stop = True
        self._work.set()
        if self._thread is not None:
            self._thread.join()
        self.engine.shutdown()

    def _run(self) -> None:
        try:
            if self.engine.config.cuda_stream:        # the runner's green stream (cuda_stream_sms), else a new one
                green = getattr(self.engine.runner, "stream", None)
                own_stream(resolve_device(self.engine.config.device),
                           high_priority=self.engine.config.cuda_stream_priority == "high", stream=green)
            while not self._stop:
                with self._lock:
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                items = self._core.apply(adds, aborts)
                busy = not self.engine.is_finished()
                if busy:
                    items += self._core.step()
                if items:
                    self._call(1, items)
                if not busy or self.engine.waits_for_input():     # idle until a request, abort or input row
                    self._work.wait()
                    self._work.clear()
        except BaseException as err:  # the engine is broken: fail everyone, report unhealthy
            log.exception("AR engine loop died")
            self._call(2, err)


# ============================================================================ child process
class ProcessCore:
    """The engine in a child process. Messages are pickled over a socket pair: ("add", ...),
    ("abort", id), ("batch", [those, in order]) (one loop turn's), ("shutdown",) in;
    ("out", items, stats) / ("fatal", err) back."""

    def __init__(self, config: AREngineConfig, start_timeout_s: float = 900.0):
        from omni_ray.ar.models.checkpoint import checkpoint_layout

        self.layout = checkpoint_layout(config.model.path)      # generate tiny/shape checkpoints once, here
        self.tokenizer = self.layout.load_tokenizer()
        self.model_name, self.max_model_len = config.model.served_name, config.scheduler.max_model_len
        parent, child = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "omni_ray.ar.engine.engine_core", str(child.fileno())],
                                     pass_fds=(child.fileno(),), env=env)
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send(config.model_dump_json())
        self._stats: dict = {}
        self._outbox: list[tuple] = []               # adds and aborts of this loop turn (``_queue``)
        self._outbox_lock = threading.Lock()
        self._flush_due = False                      # a flush is scheduled on the loop
        self._lock = threading.Lock()                # sends come from the loop and from shutdown
        self._frames = FrameReader()                 # results: whole messages out of a non-blocking socket
        # profiling (engine.step_log): when this process sent requests on to the core
        self._flush_log = open(config.step_log, "a", buffering=1) if config.step_log else None  # noqa: SIM115
        deadline = time.monotonic() + start_timeout_s
        while not self.conn.poll(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._kill()
                raise EngineError(f"AR engine process failed to start (exit code {self.proc.returncode})")
        msg = self._recv()
        if msg[0] != "ready":
            self._kill()
            raise msg[1] if isinstance(msg[1], OmniError) else EngineError(f"AR engine failed to start: {msg[1]}")
        self._stats = msg[1]
        self.max_model_len = msg[2]                  # clamped to the model's positions by the engine
        self._loop = None

    def start(self, loop: asyncio.AbstractEventLoop, deliver, fail) -> None:
        """Read results on ``loop`` from now on (called again when the caller's loop changes)."""
        self._stop_reading()
        self._loop, self._deliver, self._fail = loop, deliver, fail
        os.set_blocking(self.conn.fileno(), False)   # as uvloop's add_reader leaves it: reads never block the loop
        loop.add_reader(self.conn.fileno(), self._readable)
        self._flush()              # what a previous loop queued and closed before flushing

    def add(self, rid: str, prompt, params, stream_text: bool) -> None:
        self._queue(("add", rid, prompt, params, stream_text))

    def abort(self, rid: str) -> None:
        self._queue(("abort", rid))

    def _queue(self, msg) -> None:
        """Send ``msg`` at the end of this event-loop turn, with every other add and abort of the
        turn, in order, as one message (a burst's requests: one pickle and one write)."""
        with self._outbox_lock:
            self._outbox.append(msg)
            schedule, self._flush_due = not self._flush_due, True
        if schedule:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._flush)     # an abort may come from a Serve worker thread
            else:
                self._flush()

    def _flush(self) -> None:
        with self._outbox_lock:
            msgs, self._outbox, self._flush_due = self._outbox, [], False
        if msgs:
            sent_at = time.time()                     # before the send: the core may take them at once
            self._send(msgs[0] if len(msgs) == 1 else ("batch", msgs))
            if self._flush_log is not None:
                adds = sum(m[0] == "add" for m in msgs)
                if adds:
                    self._flush_log.write(f'{{"t": {sent_at:.6f}, "flush": {adds}}}\n')

    def stats(self) -> dict:
        return dict(self._stats)

    def describe(self):
        return {"process": self.proc.pid}

    def check_health(self) -> None:
        if self.proc.poll() is not None:
            raise EngineError(f"AR engine process exited (code {self.proc.returncode})")

    def shutdown(self) -> None:
        self._stop_reading()
        try:
            self._flush()
            self._send(("shutdown",))
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - already gone or stuck: make sure it is gone
            self._kill()
        self.conn.close()
        if self._flush_log is not None:
            self._flush_log.close()

    # ------------------------------------------------------------------ plumbing
    def _send(self, msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            write_frame(self.conn.fileno(), data)

    def _recv(self):
        return pickle.loads(self.conn.recv_bytes())

    def _readable(self) -> None:
        """Whatever the socket holds now, cut into whole messages (``FrameReader``): under uvloop the fd
        is non-blocking, so a large reply (hidden states: megabytes) arrives over several callbacks."""
        try:
            frames = self._frames.read(self.conn.fileno())
        except (EOFError, OSError):
            frames = None
        for data in frames or ():
            msg = pickle.loads(data)
            if msg[0] == "out":
                self._stats = msg[2]
                if msg[1]:
                    self._deliver(msg[1])
            else:                                 # ("fatal", err)
                self._stop_reading()
                self._fail(msg[1] if isinstance(msg[1], BaseException) else EngineError(str(msg[1])))
                return
        if frames is None:
            self._stop_reading()
            code = self.proc.poll()
            self._fail(EngineError(f"AR engine process exited (code {code})"))

    def _stop_reading(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.conn.fileno())

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _serve_child(fd: int) -> None:
    """The child process: build the engine, then apply messages and step until told to stop."""
    from omni_ray.ar.engine.llm_engine import LLMEngine

    conn = Connection(fd)
    send = lambda msg: conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))  # noqa: E731
    config = AREngineConfig.model_validate_json(conn.recv())
    try:
        engine = LLMEngine(config)
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        send(("failed", err if isinstance(err, OmniError) else repr(err)))
        return
    core = CoreLoop(engine)
    freeze_startup_heap()           # torch, the model: never walked again by a full collection
    send(("ready", engine.engine_stats(), engine.max_model_len))
    emit, done = _sender(send) if config.core_send_thread else (send, lambda: None)
    try:
        while True:
            adds, aborts = [], []
            wait = None if engine.is_finished() or engine.waits_for_input() else 0   # idle: block until a message
            while conn.poll(wait):
                msg = pickle.loads(conn.recv_bytes())
                for m in (msg[1] if msg[0] == "batch" else [msg]):
                    if m[0] == "add":
                        adds.append(m[1:])
                    elif m[0] == "abort":
                        aborts.append(m[1])
                    else:                                   # shutdown
                        done()
                        engine.shutdown()
                        return
                wait = 0
            items = core.apply(adds, aborts)
            if not engine.is_finished():
                items += core.step()
            emit(("out", items, engine.engine_stats()))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return                                              # the parent went away
    except BaseException as err:  # noqa: BLE001 - the engine is broken: tell the parent, exit
        log.exception("AR engine process died")
        try:
            emit(("fatal", err if isinstance(err, OmniError) else EngineError(f"AR engine failed: {err!r}")))
            done()                                          # the error reaches the parent before the exit
        except Exception:  # noqa: BLE001
            pass
        raise SystemExit(1) from None


def write_frame(fd: int, data: bytes) -> None:
    """``data`` as one ``Connection.recv_bytes`` message on ``fd``, whole even when ``fd`` is non-blocking
    (the event loop's ``add_reader`` makes it so under uvloop): a message larger than the socket's buffer
    (a prompt with images: megabytes of pixels) waits for the reader instead of failing half-written."""
    n = len(data)
    header = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
    for chunk in (memoryview(header), memoryview(data)):
        while chunk:
            try:
                chunk = chunk[os.write(fd, chunk):]
            except BlockingIOError:
                select.select([], [fd], [])


class FrameReader:
    """The reading side of ``write_frame`` over a non-blocking fd: ``read(fd)`` takes what the socket
    holds and returns the messages completed so far (a message may span many calls); raises EOFError
    when the writer is gone."""

    def __init__(self):
        self._buf = bytearray()

    def read(self, fd: int) -> list[bytes]:
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                raise EOFError
            self._buf += chunk
            if len(chunk) < 1 << 20:
                break
        out = []
        while True:
            size, start = self._frame_size()
            if size is None or len(self._buf) < start + size:
                return out
            out.append(bytes(self._buf[start:start + size]))
            del self._buf[:start + size]

    def _frame_size(self) -> tuple[int | None, int]:
        if len(self._buf) < 4:
            return None, 0
        (n,) = struct.unpack_from("!i", self._buf)
        if n >= 0:
            return n, 4
        if len(self._buf) < 12:
            return None, 0
        return struct.unpack_from("!Q", self._buf, 4)[0], 12


def _sender(send):
    """(emit, done): ``emit(msg)`` hands ``msg`` to a thread that pickles and sends it while the
    loop goes on to the next step (the GPU wait releases the GIL), saving the loop ~0.25 ms of
    sending per step; ``done()`` sends what is left and stops the thread."""
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def run() -> None:
        while (msg := outbox.get()) is not None:
            try:
                send(msg)
            except OSError:                                 # the parent went away: the loop sees EOF
                return

    thread = threading.Thread(target=run, name="omni-ar-core-send", daemon=True)
    thread.start()

    def done() -> None:
        outbox.put(None)
        thread.join(timeout=10)

    return outbox.put, done


def make_core(config: AREngineConfig):
    """ProcessCore where ``config.core_process`` asks for it (auto: one rank), else ThreadCore.
    On CPU the child's main thread also runs PyTorch's kernels faster than a second thread of the
    serving process does (a 16-token request on the tiny Qwen3: 16.5 ms vs 26.6 ms; offline 14 ms)."""
    mode = config.core_process
    if mode == "auto":
        mode = "on" if config.parallel.tensor_parallel_size == 1 else "off"
    if mode == "on" and config.parallel.tensor_parallel_size > 1:
        raise InvalidRequestError("core_process needs tensor_parallel_size 1 (rank 0 drives its Ray workers "
                                  "from the replica)", param="core_process")
    return ProcessCore(config) if mode == "on" else ThreadCore(config)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s omni-ar-core %(levelname)s %(message)s")
    from omni_ray.ar.engine.engine_core import _serve_child as serve  # classes pickled under their module name
    serve(int(sys.argv[1]))
