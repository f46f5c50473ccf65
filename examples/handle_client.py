"""Another Ray Serve application calling omni-ray through its handle (no HTTP in between).

    serve run serve_config.yaml                       # the omni app, named "omni"
    python examples/handle_client.py --address auto   # deploys "omni-client" beside it and calls it

``serve.get_app_handle("omni")`` returns a handle to the ``Ingress`` deployment; its methods are
typed Python calls that return plain dicts (images as PNG bytes, or PIL with output_format="pil").
"""

from __future__ import annotations

import argparse
import io

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Illustrator:
    """Writes a caption for a topic with the LLM, then draws it with the DiT."""

    def __init__(self, app_name: str = "omni"):
        self.app_name = app_name

    async def __call__(self, topic: str, size: str = "64x64", steps: int = 2) -> dict:
        omni = serve.get_app_handle(self.app_name)
        caption = await omni.generate_text.remote(
            messages=[{"role": "system", "content": "Write a one-line image caption."},
                      {"role": "user", "content": topic}], max_tokens=16, temperature=0.0)
        images = await omni.generate_images.remote(caption["text"].strip() or topic, size=size,
                                                   num_inference_steps=steps, seed=0)
        pipeline = await omni.run_pipeline.remote("text2image", topic, max_tokens=16, size=size,
                                                  num_inference_steps=steps, seed=0)
        deltas = [d async for d in omni.options(stream=True).stream_text.remote(topic, max_tokens=8)]
        return {"caption": caption["text"], "caption_tokens": caption["usage"]["completion_tokens"],
                "image_png": images["images"][0], "pipeline_text": pipeline["text"],
                "pipeline_stages": [(s["stage"], round(s["elapsed_s"], 4)) for s in pipeline["stages"]],
                "pipeline_png": pipeline["images"][0], "streamed": deltas}


app = Illustrator.bind()


def main() -> None:
    import ray
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="auto", help="the Ray cluster running the omni app")
    ap.add_argument("--topic", default="a lighthouse at dusk")
    ap.add_argument("--out", default="illustration.png")
    args = ap.parse_args()
    ray.init(address=args.address, namespace="serve")
    handle = serve.run(app, name="omni-client", route_prefix=None)
    out = handle.remote(args.topic).result()
    Image.open(io.BytesIO(out["image_png"])).save(args.out)
    print(f"caption: {out['caption']!r} ({out['caption_tokens']} tokens)")
    print(f"text2image: {out['pipeline_text']!r}, stages {out['pipeline_stages']}")
    print(f"streamed: {out['streamed']}")
    print(f"image saved to {args.out}")
    serve.delete("omni-client")


if __name__ == "__main__":
    main()
