"""A model's stage graph: its stages in order and the hand-off between each pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from omni_ray.config import PipelineConfig, PipelineStep
from omni_ray.errors import ConfigError

# what one stage gives the next ("prompt" is the request itself, only ever a first input)
Handoff = Literal["prompt", "text", "token_ids", "hidden_states", "embeddings", "latents", "codec_tokens",
                  "images", "audio", "video"]
Modality = Literal["text", "image", "audio", "video"]
Engine = Literal["ar", "dit"]


@dataclass(frozen=True)
class StageNode:
    role: str                      # its name in the graph: llm, text_encoder, denoiser, thinker, talker, ...
    engine: Engine                 # which engine runs it
    takes: Handoff
    gives: Handoff
    component: str | None = None   # the checkpoint subfolder it loads (diffusers' "text_encoder"); None: the root
    encoding: str | None = None    # AR hidden_states: the text-encoding recipe (a diffusers pipeline class)
    submodel: str | None = None    # which model of the checkpoint the engine runs (model.submodel: talker)


@dataclass(frozen=True)
class StageGraph:
    architecture: str
    nodes: tuple[StageNode, ...]
    inputs: frozenset[str] = frozenset({"text"})     # modalities a request may carry
    outputs: frozenset[str] = frozenset({"text"})    # modalities it returns
    requires: frozenset[str] = frozenset({"text"})   # modalities every request must carry (edit: text, image)

    def __post_init__(self):
        if not self.requires <= self.inputs:
            raise ValueError(f"{self.architecture}: requires {sorted(self.requires)} beyond its inputs")
        if not self.nodes or self.nodes[0].takes != "prompt":
            raise ValueError(f"{self.architecture}: a graph starts with a stage that takes the prompt")
        for a, b in zip(self.nodes, self.nodes[1:]):
            if a.gives != b.takes:
                raise ValueError(f"{self.architecture}: {a.role} gives {a.gives}, {b.role} takes {b.takes}")

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(n.role for n in self.nodes)

    def pipeline(self, stages: Mapping[str, str], description: str = "") -> PipelineConfig:
        """The pipeline that runs this graph on the config's stages (``stages``: role -> stage key)."""
        missing = [r for r in self.roles if r not in stages]
        if missing:
            raise ConfigError(f"{self.architecture} runs as {list(self.roles)}: no stage given for {missing}")
        steps = []
        for n in self.nodes:
            gives = "videos" if n.gives == "video" else n.gives          # a video model's step: its MP4s
            if n.takes not in ("prompt", "text", "hidden_states", "codec_tokens") or gives not in (
                    "text", "hidden_states", "images", "videos", "codec_tokens", "audio"):
                raise ConfigError(f"{self.architecture}: stage {n.role} hands over {n.takes} -> {n.gives}, "
                                  "which the pipeline runner does not carry yet")
            steps.append(PipelineStep(stage=stages[n.role], input=n.takes, output=gives, encoding=n.encoding))
        # the runner carries a request's image to every step: for graphs that need one (edit, Wan2.1 I2V), or
        # take one in their DiT alone (Wan2.2 TI2V's first frame); a VL model's optional images come through
        # chat content parts, not pipelines
        image = "required" if "image" in self.requires else \
            "optional" if "image" in self.inputs and all(n.engine == "dit" for n in self.nodes) else "none"
        return PipelineConfig(steps=steps, image=image,
                              description=description or f"{self.architecture}: "
                              + " -> ".join(f"{n.role} ({n.engine})" for n in self.nodes))
