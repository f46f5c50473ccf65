"""The process's step / capture lock (omni_ray/capture_lock.py): engine steps run together, a capture runs alone,
a step that captures steps aside, and nothing deadlocks."""

from __future__ import annotations

import threading
import time

from omni_ray.capture_lock import StepCaptureLock

WAIT_S = 10.0


def run(*fns):
    threads = [threading.Thread(target=f, daemon=True) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock)"


def test_steps_of_two_threads_overlap():
    lock, inside, both = StepCaptureLock(), [], threading.Event()

    def step():
        with lock.step():
            inside.append(1)
            if len(inside) == 2:
                both.set()
            assert both.wait(WAIT_S)           # the other thread's step is in flight at the same time

    run(step, step)
    assert both.is_set()


def test_a_capture_waits_for_steps_in_flight_and_new_steps_wait_for_it():
    lock, log = StepCaptureLock(), []
    stepping, capture_waiting = threading.Event(), threading.Event()

    def first_step():
        with lock.step():
            log.append("step 1 in")
            stepping.set()
            time.sleep(0.1)
            log.append("step 1 out")

    def capture():
        stepping.wait(WAIT_S)
        capture_waiting.set()
        with lock.capture():
            log.append("capture in")
            time.sleep(0.05)
            log.append("capture out")

    def second_step():
        capture_waiting.wait(WAIT_S)
        time.sleep(0.02)                       # the capture is waiting by now
        with lock.step():
            log.append("step 2")

    run(first_step, capture, second_step)
    assert log == ["step 1 in", "step 1 out", "capture in", "capture out", "step 2"]


def test_steps_that_capture_at_once_do_not_deadlock():
    """Two engines each capturing a graph inside their own step: each steps aside while it waits."""
    lock, captures = StepCaptureLock(), []
    barrier = threading.Barrier(2)

    def engine(name):
        with lock.step():
            barrier.wait(WAIT_S)               # both inside a step
            with lock.capture():
                captures.append(name)
                with lock.capture(), lock.step():  # nested capture and step on the capturing thread
                    pass
            with lock.step():                  # a re-entrant step inside its own step
                pass

    run(lambda: engine("a"), lambda: engine("b"))
    assert sorted(captures) == ["a", "b"]
    assert lock._owner is None and not lock._steps and not lock._waiting


def test_a_capture_excludes_another_capture():
    lock, active, peak = StepCaptureLock(), [0], [0]

    def capture():
        for _ in range(20):
            with lock.capture():
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                time.sleep(0.001)
                active[0] -= 1

    run(capture, capture, capture)
    assert peak[0] == 1
