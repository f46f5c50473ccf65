"""Build the Serve application from an ``OmniConfig``.

    serve run serve_config.yaml                       # args: {config: {...}} inline
    serve run deployments.app:build_app config_path=my.yaml   # an OmniConfig, or a Serve config file
    serve.run(build_app({"config": cfg_dict}), name="omni")

One deployment per stage, named by its stage key (``llm``, ``image``, ...), plus ``Ingress``. Speech
(Qwen2.5-Omni): the talker stage (an AR stage with ``model.submodel: talker``) and the token2wav stage (the DiT
stage a pipeline feeds codec_tokens) deploy as their own shims (``deployments/stages/talker.py``,
``token2wav.py``), each with its own replicas. An encoder
stage's handle goes to the AR stages that name it (``stages.<key>.encoder``) and to the ingress (for
/health and /info only: requests never reach it from there).
"""

from __future__ import annotations

from ray.serve import Application

from deployments.ingress.ingress import Ingress
from deployments.options import deployment_options, stage_options
from deployments.stages.ar import ARDeployment
from deployments.stages.dit import DiTDeployment
from deployments.stages.encoder import EncoderDeployment
from deployments.stages.fed import fed_stages
from deployments.stages.talker import TalkerDeployment
from deployments.stages.token2wav import Token2WavDeployment
from omni_ray.config import ARStageConfig, DiTStageConfig, EncoderStageConfig, OmniConfig, load_app_config, load_config
from omni_ray.errors import ConfigError
from omni_ray.graphs import expand_pipelines


def resolve_config(args: dict) -> OmniConfig:
    """The app's config: ``args.config`` (an OmniConfig or its mapping) or ``args.config_path``, a
    YAML file holding either a bare OmniConfig or a whole Serve config file (``serve_config.yaml``:
    its application named ``args.app_name``, default the first), as ``OmniLLM`` accepts."""
    if "config" in args and args["config"] is not None:
        cfg = args["config"]
        return cfg if isinstance(cfg, OmniConfig) else load_config(cfg)
    if "config_path" in args:
        return load_app_config(str(args["config_path"]), args.get("app_name"))
    raise ConfigError("build_app needs args.config (an OmniConfig mapping) or args.config_path (a YAML file: "
                      "an OmniConfig, or a Serve config file with applications: [...])")


def build_app(args: dict) -> Application:
    cfg = expand_pipelines(resolve_config(args or {}))
    limits = cfg.app.limits.model_dump()
    media = cfg.app.media.model_dump()
    services = {"app": cfg.app.name, "scheduler": cfg.scheduler.model_dump(), "dit_cache": cfg.dit_cache.model_dump(),
                "metrics": cfg.app.metrics.model_dump()}
    stages = {}
    for key, stage in cfg.stages.items():        # encoder stages first: the AR stages that use them get their handle
        if isinstance(stage, EncoderStageConfig):
            stages[key] = EncoderDeployment.options(**stage_options(key, stage)).bind(key, stage.model_dump(), services)
    fed = fed_stages(cfg)                        # speech: talker and token2wav stages
    for key, stage in cfg.stages.items():
        opts = stage_options(key, stage, pinned=key in fed)
        if fed.get(key) == "talker":
            stages[key] = TalkerDeployment.options(**opts).bind(key, stage.model_dump(), limits, services)
        elif fed.get(key) == "token2wav":
            stages[key] = Token2WavDeployment.options(**opts).bind(key, stage.model_dump(), services)
        elif isinstance(stage, ARStageConfig):
            encoder = stages[stage.encoder] if stage.encoder else None
            stages[key] = ARDeployment.options(**opts).bind(key, stage.model_dump(), limits, services, media, encoder)
        elif isinstance(stage, DiTStageConfig):
            stages[key] = DiTDeployment.options(**opts).bind(key, stage.model_dump(), services, media)
    stages = {k: stages[k] for k in cfg.stages}  # the config's order
    ingress = Ingress.options(**deployment_options("Ingress", cfg.app.ingress))
    return ingress.bind(cfg.model_dump(), stages)
