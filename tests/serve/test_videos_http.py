"""The video job API on the default app (``serve run serve_config.yaml``, its tiny Wan2.1 stage): a job
answered at once, polled to ``completed``, its MP4 decoded back by PyAV (frame count, size, rate);
DELETE of a running job frees its DiT slot (the engine's counters); bad input is a 400 naming the field."""

import base64
import io
import time
import uuid

import pytest

pytestmark = pytest.mark.ray


def stage_stats(client, stage: str) -> dict:
    return client.get("/info").json()["stages"][stage]["stats"]


def wait_for(client, video_id: str, done, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while not done(job := client.get(f"/v1/videos/{video_id}").json()):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def test_video_job_end_to_end(client):
    import av

    r = client.post("/v1/videos", json={"prompt": f"a red fox {uuid.uuid4().hex[:6]}", "size": "48x32",
                                        "seconds": "0.5", "fps": 8, "num_inference_steps": 2, "seed": 1})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["progress"] < 100
    assert job["model"] == "tiny-wan2.1-t2v" and job["num_frames"] == 5 and job["fps"] == 8   # 0.5 s x 8 -> 4k + 1
    done = wait_for(client, job["id"], lambda j: j["status"] not in ("queued", "in_progress"))
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None, done
    assert done["expires_at"] > done["completed_at"] >= done["created_at"]
    assert job["id"] in [v["id"] for v in client.get("/v1/videos").json()["data"]]
    content = client.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(content.content)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
    gone = client.delete(f"/v1/videos/{job['id']}")
    assert gone.json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert client.get(f"/v1/videos/{job['id']}").status_code == 404


def test_deleting_a_running_job_frees_its_dit_slot(client):
    aborted = stage_stats(client, "video")["requests_aborted"]
    r = client.post("/v1/videos", json={"prompt": "a slow video", "size": "32x32", "num_frames": 5,
                                        "num_inference_steps": 100, "seed": 2})
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    wait_for(client, vid, lambda j: j["status"] == "in_progress" and j["progress"] > 0)
    s = stage_stats(client, "video")
    assert s["active_requests"] == 1, s                       # it holds a slot of the DiT engine
    assert client.delete(f"/v1/videos/{vid}").json()["deleted"] is True
    deadline = time.monotonic() + 60
    while (s := stage_stats(client, "video"))["active_requests"] + s["waiting_requests"] + s["num_streams"] > 0:
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    assert s["requests_aborted"] == aborted + 1 and s["steps"] < 100
    assert client.get(f"/v1/videos/{vid}").status_code == 404


@pytest.mark.parametrize("body, param", [
    ({"size": "40x32"}, "size"),                              # not a multiple of 16
    ({"size": "512x512"}, "size"),                            # past the stage's max_pixels
    ({"num_frames": 6}, "num_frames"),                        # not 4k + 1
    ({"num_frames": 37}, "num_frames"),                       # past max_frames (33)
    ({"seconds": "10"}, "seconds"),                           # 161 frames at 16 fps
    ({"seconds": "x"}, "seconds"),
    ({"seconds": 1, "num_frames": 5}, "seconds"),
    ({"fps": 0}, "fps"),
    ({"input_reference": "data:image/png;base64,AAAA"}, "input_reference"),    # a text-to-video model
    ({"model": "tiny-pixart"}, "model"),                      # not a video model
])
def test_bad_video_requests_are_400_naming_the_field(client, body, param):
    r = client.post("/v1/videos", json={"prompt": "a fox", "size": "32x32", "num_frames": 5} | body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_image_to_video_job(client):
    import av
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (56, 40), (200, 90, 30)).save(buf, format="PNG")
    frame = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "tiny-wan2.1-i2v", "prompt": "it starts to move", "size": "48x32", "num_frames": 5,
            "num_inference_steps": 2, "seed": 3}
    missing = client.post("/v1/videos", json=body)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input_reference"
    r = client.post("/v1/videos", json=body | {"input_reference": frame})
    assert r.status_code == 200, r.text
    done = wait_for(client, r.json()["id"], lambda j: j["status"] not in ("queued", "in_progress"))
    assert done["status"] == "completed", done
    with av.open(io.BytesIO(client.get(f"/v1/videos/{done['id']}/content").content)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)


def test_unknown_videos_and_video_models_elsewhere(client):
    assert client.get("/v1/videos/video-nope").status_code == 404
    assert client.get("/v1/videos/video-nope/content").status_code == 404
    r = client.post("/v1/images/generations", json={"model": "tiny-wan2.1-t2v", "prompt": "a fox"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
