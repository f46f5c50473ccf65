"""Pipelines written as stage graphs (``pipelines.<name>.graph``) turned into steps, once, when an
app or ``OmniLLM`` starts: the checkpoint of ``graph.model``'s stage names the graph."""

from __future__ import annotations

from omni_ray.config import OmniConfig, PipelineConfig, validate
from omni_ray.errors import ConfigError
from omni_ray.graphs.registry import graph_for


def expand_pipelines(cfg: OmniConfig) -> OmniConfig:
    """``cfg`` with every graph pipeline as explicit steps (explicit ones unchanged)."""
    if all(p.graph is None for p in cfg.pipelines.values()):
        return cfg
    return cfg.model_copy(update={"pipelines": {k: _expand(cfg, k, p) for k, p in cfg.pipelines.items()}})


def _expand(cfg: OmniConfig, name: str, p: PipelineConfig) -> PipelineConfig:
    if p.graph is None:
        return p
    where = f"pipelines.{name}.graph"
    graph = graph_for(cfg.stages[p.graph.model].engine.model.path)
    roles = dict(p.graph.stages)
    unknown = sorted(set(roles) - set(graph.roles))
    if unknown:
        raise ConfigError(f"{where}.stages: {graph.architecture} has no role {unknown}; its roles: {list(graph.roles)}")
    left = [r for r in graph.roles if r not in roles]
    if len(left) == 1:
        roles[left[0]] = p.graph.model
    elif left:
        raise ConfigError(f"{where}.stages: name a stage for each of {left} ({graph.architecture} runs as "
                          f"{list(graph.roles)}; only one role may be left to `model`)")
    for n in graph.nodes:
        kind = cfg.stages[roles[n.role]].kind
        if kind != n.engine:
            raise ConfigError(f"{where}: role {n.role} of {graph.architecture} runs on the {n.engine} engine; "
                              f"stage {roles[n.role]!r} is {kind}")
        submodel = cfg.stages[roles[n.role]].engine.model.submodel if kind == "ar" else None
        if submodel != n.submodel:
            raise ConfigError(f"{where}: role {n.role} of {graph.architecture} runs model.submodel "
                              f"{n.submodel!r}; stage {roles[n.role]!r} runs {submodel!r}")
        if n.submodel is not None or (n.engine == "dit" and n.takes == "codec_tokens"):   # the same checkpoint
            path, own = cfg.stages[roles[n.role]].engine.model.path, cfg.stages[p.graph.model].engine.model.path
            if path.rstrip("/") != own.rstrip("/"):
                raise ConfigError(f"{where}: role {n.role} of {graph.architecture} loads the checkpoint {own!r}; "
                                  f"stage {roles[n.role]!r} loads {path!r}")
        if n.component is not None:          # e.g. Qwen-Image's text encoder: the same directory's text_encoder/
            path, own = cfg.stages[roles[n.role]].engine.model.path, cfg.stages[p.graph.model].engine.model.path
            if path.rstrip("/") not in (own.rstrip("/"), f"{own.rstrip('/')}/{n.component}"):
                raise ConfigError(f"{where}: role {n.role} of {graph.architecture} loads {n.component}/ of the "
                                  f"checkpoint {own!r}; stage {roles[n.role]!r} loads {path!r}")
    out = graph.pipeline(roles, p.description)
    # the expanded steps must also pass the config's own pipeline checks
    validate(OmniConfig, cfg.model_dump() | {"pipelines": {name: out.model_dump()}})
    return out
