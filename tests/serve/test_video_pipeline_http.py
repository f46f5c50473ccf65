"""A video pipeline (``graph: {model: video}``, the default app's tiny Wan2.1 stage) over
``/v1/pipelines/{name}``: streamed, every denoising step arrives as a ``progress`` event before the
result, whose MP4 PyAV decodes back (frame count, size); not streamed, the same video in one body."""

import base64
import io
import uuid

import numpy as np
import pytest

from tests.serve.test_pipelines import sse_events

pytestmark = pytest.mark.ray

ARGS = {"size": "48x32", "num_inference_steps": 3, "seed": 3, "stage_args": {"video": {"num_frames": 5}}}


def mp4_frames(b64: str) -> list:
    import av

    with av.open(io.BytesIO(base64.b64decode(b64))) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def test_video_pipeline_streams_progress_then_the_mp4(client):
    prompt = f"a red fox {uuid.uuid4().hex[:6]}"
    with client.stream("POST", "/v1/pipelines/video", json={"prompt": prompt, "stream": True, **ARGS}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    kinds = [e["type"] for e in events[:-1]]
    assert kinds[0] == "start" and kinds[1] == "stage_start" and kinds[-1] == "result"
    assert [(e["current"], e["total"]) for e in events if isinstance(e, dict) and e["type"] == "progress"] == \
        [(1, 3), (2, 3), (3, 3)]
    end, result = events[-3], events[-2]
    assert end["type"] == "stage_end" and end["output"] == "videos" and end["num_videos"] == 1
    assert result["images"] is None and len(result["videos"]) == 1
    video = result["videos"][0]
    assert video["content_type"] == "video/mp4"
    frames = mp4_frames(video["b64_json"])
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)

    whole = client.post("/v1/pipelines/video", json={"prompt": prompt, **ARGS})
    assert whole.status_code == 200, whole.text
    again = mp4_frames(whole.json()["videos"][0]["b64_json"])                # same seed: the same video
    assert len(again) == 5 and max(float(np.abs(a.astype(int) - b).mean()) for a, b in zip(again, frames)) < 1


def test_video_pipeline_bad_frames_is_a_400(client):
    r = client.post("/v1/pipelines/video", json={"prompt": "a fox", **ARGS, "stage_args": {"video": {"num_frames": 6}}})
    assert r.status_code == 400 and r.json()["error"]["param"].endswith("num_frames"), r.text
