"""Video out: frames -> an MP4 file (H.264, yuv420p) in memory, with PyAV (FFmpeg's libraries).

    data = encode_mp4(frames, fps=16)        # frames: uint8 [F, H, W, 3] (RGB); H and W even

The container and codec are FFmpeg's (libx264 through PyAV), never written by hand; the file is
built in memory (nothing touches the disk).
"""

from __future__ import annotations

import io

import numpy as np

CRF = 18                      # libx264 quality (lower: better, larger); 18 is visually lossless-ish


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"encode_mp4 takes uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even width and height, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps), options={"crf": str(CRF)})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
