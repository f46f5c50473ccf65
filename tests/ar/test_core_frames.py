"""The engine core's messages arrive whole over a non-blocking socket (the serving loop's ``add_reader``
makes the parent's end non-blocking under uvloop): a message far larger than the socket buffer, sent
while the core is not reading yet, waits for it instead of failing half-written (BlockingIOError)."""

import os
import pickle
import socket
import threading
import time
from multiprocessing.connection import Connection

from omni_ray.ar.engine.engine_core import write_frame


def test_large_message_over_a_non_blocking_socket():
    parent, child = socket.socketpair()
    parent.setblocking(False)
    msg = ("add", "r-1", os.urandom(8 << 20), [1, 2, 3])         # 8 MiB: many socket buffers
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    got = []

    def read():
        time.sleep(0.2)                                           # the core is busy with a step
        conn = Connection(child.detach())
        got.append(pickle.loads(conn.recv_bytes()))
        got.append(conn.recv_bytes())

    t = threading.Thread(target=read)
    t.start()
    try:
        write_frame(parent.fileno(), data)
        write_frame(parent.fileno(), b"next")                     # the stream stays framed after it
    finally:
        t.join(timeout=30)
        parent.close()
    assert got == [msg, b"next"]


def test_frame_reader_reassembles_messages_split_across_reads():
    """The parent reads the core's replies from a non-blocking fd: a large reply (hidden states) comes
    over several readable callbacks, and several small ones may come in one."""
    from omni_ray.ar.engine.engine_core import FrameReader

    reader_end, writer_end = socket.socketpair()
    reader_end.setblocking(False)
    big = os.urandom(5 << 20) + b"end"
    got, reader = [], FrameReader()

    def write():
        for data in (b"a", big, b"b", b"c"):
            write_frame(writer_end.fileno(), data)
        writer_end.close()

    t = threading.Thread(target=write)
    t.start()
    calls = 0
    try:
        while True:
            try:
                got += reader.read(reader_end.fileno())
            except EOFError:
                break
            calls += 1
            time.sleep(0.001)
    finally:
        t.join(timeout=30)
        reader_end.close()
    assert got == [b"a", big, b"b", b"c"]
    assert calls > 2                                              # the big one did span several reads
