"""``omni-ray``: the offline jobs from the command line.

    omni-ray generate --config serve_config.yaml --stage llm --prompt "Hello" --max-tokens 32
    omni-ray generate --config serve_config.yaml --pipeline text2image --prompt "a fox" --out out/
    omni-ray image --config serve_config.yaml --prompt "a lighthouse" --size 64x64 --steps 4 --out out/
    omni-ray make-tiny tiny:qwen3 tiny:pixart          # or --all, --list
    omni-ray bench ar --quick                           # benchmarks/bench_ar.py with these arguments
    omni-ray docs --check                               # docs/configuration.md in sync? (tools/gen_config_docs.py)
    omni-ray validate serve_config.gpu.yaml             # load a config, print its stages and pipelines

``--config`` takes a Serve config file (``serve_config.yaml``: its first application's
``args.config``, or ``--app NAME``) or a bare OmniConfig YAML. Generation runs in this process
through ``OmniLLM`` (omni_ray/offline.py), without Ray. Errors exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from omni_ray.config import OmniConfig, PipelineConfig, PipelineStep, load_app_config, validate
from omni_ray.errors import InvalidRequestError, OmniError
from omni_ray.graphs import expand_pipelines

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("ar", "async", "cache", "dit", "dit_parallel", "gemv", "scheduler", "serve", "tp")


# ----------------------------------------------------------------------------- config
def app_config(args) -> OmniConfig:
    cfg = expand_pipelines(load_app_config(args.config, args.app))
    if getattr(args, "device", None):
        data = cfg.model_dump()
        for stage in data["stages"].values():
            stage["engine"]["device"] = args.device
        cfg = validate(OmniConfig, data)
    return cfg


def _default_stage(cfg: OmniConfig, kind: str) -> str:
    """The first stage of ``kind`` that takes a prompt (a DiT fed only by hidden states does not)."""
    keys = [k for k, s in cfg.stages.items() if s.kind == kind]
    if not keys:
        raise InvalidRequestError(f"the config has no {kind} stage; stages: {sorted(cfg.stages)}", param="stage")
    fed = {s.stage for p in cfg.pipelines.values() for s in p.steps if s.input == "hidden_states"}
    return next((k for k in keys if k not in fed), keys[0])


def with_stage_pipeline(cfg: OmniConfig, stage: str, output: str, system: str | None = None) -> tuple[OmniConfig, str]:
    """``cfg`` plus a one-step pipeline running ``stage`` on the prompt; returns its name."""
    if stage not in cfg.stages:
        raise InvalidRequestError(f"unknown stage {stage!r}; stages: {sorted(cfg.stages)}", param="stage")
    name = f"cli:{stage}"
    step = PipelineStep(stage=stage, input="prompt", output=output, system_prompt=system)
    return cfg.model_copy(update={"pipelines": {**cfg.pipelines, name: PipelineConfig(steps=[step])}}), name


def _pipeline_for(cfg: OmniConfig, args, kind: str, output: str) -> tuple[OmniConfig, str]:
    if args.pipeline and args.stage:
        raise InvalidRequestError("give --stage or --pipeline, not both")
    if args.pipeline:
        if args.pipeline not in cfg.pipelines:
            raise InvalidRequestError(f"unknown pipeline {args.pipeline!r}; pipelines: {sorted(cfg.pipelines)}")
        return cfg, args.pipeline
    stage = args.stage or _default_stage(cfg, kind)
    want = "text" if cfg.stages.get(stage) is not None and cfg.stages[stage].kind == "ar" else "images"
    return with_stage_pipeline(cfg, stage, want if output == "auto" else output, getattr(args, "system", None))


# ----------------------------------------------------------------------------- generation
def stage_kwargs(args, pipe: PipelineConfig, kinds: dict[str, str]) -> dict:
    """OmniLLM.generate keywords for the kinds of step in ``pipe`` (``--seed`` goes to every stage)."""
    kw: dict = {"seed": args.seed}
    if any(kinds[s.stage] == "ar" and s.output == "text" for s in pipe.steps):
        kw |= {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if pipe.steps[-1].output == "images":
        kw |= {"size": args.size, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
               "negative_prompt": args.negative_prompt, "n": args.n, "cache": parse_cache(args.cache)}
    return {k: v for k, v in kw.items() if v is not None}


def parse_cache(spec: str | None) -> dict | None:
    """``teacache:0.3`` / ``fbcache`` -> ``{"method": ..., "threshold": ...}``."""
    if not spec:
        return None
    method, _, threshold = spec.partition(":")
    out: dict = {"method": method}
    if threshold:
        try:
            out["threshold"] = float(threshold)
        except ValueError:
            raise InvalidRequestError(f"--cache threshold must be a number, got {threshold!r}") from None
    return out


def save_images(outs, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, o in enumerate(outs):
        for j, im in enumerate(o.images or []):
            p = out_dir / f"{i:03d}-{j}.png"
            im.save(p)
            paths.append(p)
    return paths


def run_generation(args, kind: str) -> int:
    from omni_ray.offline import OmniLLM

    cfg, pipeline = _pipeline_for(app_config(args), args, kind, "auto")
    kwargs = stage_kwargs(args, cfg.pipelines[pipeline], {k: s.kind for k, s in cfg.stages.items()})
    with OmniLLM(cfg) as llm:
        outs = llm.generate(pipeline, list(args.prompt), use_tqdm=not args.quiet, **kwargs)
    paths = save_images(outs, Path(args.out)) if any(o.images for o in outs) else []
    if args.json:
        print(json.dumps({"outputs": [{"prompt": o.prompt, "text": o.text, "usage": o.usage, "stages": o.stages,
                                       "hidden_states_shape": None if o.hidden_states is None
                                       else list(o.hidden_states.shape)} for o in outs],
                          "images": [str(p) for p in paths]}, default=str))
        return 0
    for o in outs:
        if o.text is not None:
            print(o.text if len(outs) == 1 else f"[{o.prompt}] {o.text}")
        if o.hidden_states is not None:
            print(f"[{o.prompt}] hidden states {tuple(o.hidden_states.shape)}")
    for p in paths:
        print(p)
    return 0


# ----------------------------------------------------------------------------- other commands
def make_tiny(args) -> int:
    from omni_ray.testing import available, resolve_model

    if args.list:
        print("\n".join(available()))
        return 0
    names = [n for n in available() if n.startswith("tiny:")] if args.all else args.models
    if not names:
        raise InvalidRequestError("name the checkpoints (e.g. tiny:qwen3), or pass --all / --list")
    for n in names:
        print(f"{n}\t{resolve_model(n)}")
    return 0


def bench(args) -> int:
    script = ROOT / "benchmarks" / f"bench_{args.which}.py"
    if not script.exists():
        raise OmniError(f"{script} not found: `omni-ray bench` runs from a source checkout (pip install -e .)")
    rest = [a for a in args.args if a != "--"]
    return subprocess.call([sys.executable, str(script), *rest], cwd=ROOT)


def docs(args) -> int:
    script = ROOT / "tools" / "gen_config_docs.py"
    if not script.exists():
        raise OmniError(f"{script} not found: `omni-ray docs` runs from a source checkout (pip install -e .)")
    flags = ["--check"] if args.check else ["--write"] if args.write else []
    return subprocess.call([sys.executable, str(script), *flags, *(["--out", str(args.out)] if args.out else [])],
                           cwd=ROOT)


def validate_cmd(args) -> int:
    cfg = app_config(args)
    print(f"app {cfg.app.name!r}: OK")
    for k, s in cfg.stages.items():
        print(f"  stage {k}: {s.kind} {s.engine.model.path} ({s.engine.model.served_name}) on {s.engine.device}")
    for k, p in cfg.pipelines.items():
        print(f"  pipeline {k}: " + " -> ".join(f"{s.stage}[{s.input}->{s.output}]" for s in p.steps))
    return 0


# ----------------------------------------------------------------------------- parser
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="serve_config.yaml", help="Serve config file or OmniConfig YAML")
    p.add_argument("--app", default=None, help="application name in a Serve config file (default: the first)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override every engine's device")


def _gen_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (batched)")
    p.add_argument("--stage", default=None, help="run one stage on the prompt")
    p.add_argument("--pipeline", default=None, help="run a pipeline of the config")
    p.add_argument("--seed", type=int, default=None, help="seed of every stage")
    p.add_argument("--out", default="omni-ray-out", help="directory for images")
    p.add_argument("--json", action="store_true", help="print the outputs as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    text = p.add_argument_group("text stages")
    text.add_argument("--max-tokens", type=int, default=None)
    text.add_argument("--temperature", type=float, default=None)
    text.add_argument("--top-p", type=float, default=None)
    text.add_argument("--system", default=None, help="system prompt (with --stage)")
    img = p.add_argument_group("image stages")
    img.add_argument("--size", default=None, help="WxH, e.g. 512x512")
    img.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    img.add_argument("--guidance", type=float, default=None, help="guidance_scale")
    img.add_argument("--negative-prompt", default=None)
    img.add_argument("--n", type=int, default=None, help="images per prompt")
    img.add_argument("--cache", default=None, help="step cache: teacache[:threshold] or fbcache[:threshold]")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="omni-ray", description="omni-ray offline jobs")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text (or a pipeline's output) from prompts")
    _gen_args(g)
    g.set_defaults(func=lambda a: run_generation(a, "ar"))

    i = sub.add_parser("image", help="images from prompts (a DiT stage or an image pipeline)")
    _gen_args(i)
    i.set_defaults(func=lambda a: run_generation(a, "dit"))

    t = sub.add_parser("make-tiny", help="generate tiny local checkpoints (random weights, real architectures)")
    t.add_argument("models", nargs="*", help="e.g. tiny:qwen3 tiny:pixart")
    t.add_argument("--all", action="store_true", help="every tiny:* checkpoint")
    t.add_argument("--list", action="store_true", help="list the built-in names")
    t.set_defaults(func=make_tiny)

    b = sub.add_parser("bench", help="run benchmarks/bench_<which>.py with the remaining arguments")
    b.add_argument("which", choices=BENCHES)
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (e.g. --quick)")
    b.set_defaults(func=bench)

    d = sub.add_parser("docs", help="docs/configuration.md, the configuration reference (tools/gen_config_docs.py)")
    grp = d.add_mutually_exclusive_group()
    grp.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    grp.add_argument("--write", action="store_true", help="rewrite docs/configuration.md")
    d.add_argument("--out", type=Path, default=None)
    d.set_defaults(func=docs)

    v = sub.add_parser("validate", help="load a config and print its stages and pipelines")
    v.add_argument("config", help="Serve config file or OmniConfig YAML")
    v.add_argument("--app", default=None)
    v.set_defaults(func=validate_cmd, device=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OmniError as err:
        print(f"omni-ray {args.command}: {type(err).__name__}: {err.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
