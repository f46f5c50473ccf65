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
