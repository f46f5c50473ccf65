"""What the app serves, by the names requests use: stages (by served name or stage key) and pipelines."""

import time

from deployments.stages.fed import fed_stages
from omni_ray.config import OmniConfig, PipelineConfig, PipelineStep
from omni_ray.errors import ConfigError, InvalidRequestError, ModelNotFoundError


class Catalog:
    def __init__(self, config: OmniConfig):
        self.config = config
        self.kinds = {k: s.kind for k, s in config.stages.items()}
        self.speech = fed_stages(config)        # stage key -> talker | token2wav
        # parts of another stage's model, not models of their own: media encoders (called by their AR stage),
        # a talker and token2wav (speech out of their thinker's pipeline)
        self.inner = {k for k, kind in self.kinds.items() if kind == "encoder"} | set(self.speech)
        self.names = {k: s.engine.model.served_name for k, s in config.stages.items()}
        self.created = int(time.time())
        self._tool_parsers: dict[str, str | None] = {}
        self._modalities: dict[str, dict | None] = {}
        self._requires: dict[str, frozenset | None] = {}
        self._voices: dict[str, list[str] | None] = {}

    def model_card(self, key: str) -> dict:
        """OpenAI's model object of stage ``key`` (``GET /v1/models``, ``/v1/models/{id}``), plus the stage."""
        card = {"id": self.names[key], "object": "model", "created": self.created, "owned_by": "omni-ray",
                "stage": key, "kind": self.kinds[key]}
        modalities = self.modalities(key)
        return card | {"modalities": modalities} if modalities else card

    def modalities(self, key: str) -> dict | None:
        """{"input": [...], "output": [...]}: what the stage's checkpoint takes and gives, from its stage
        graph (omni_ray/graphs); a stage that runs an inner role of its graph (Qwen-Image's text encoder)
        gives that role's hand-off (hidden_states); a thinker whose speech pipeline starts at it also audio.
        None when the checkpoint is not readable here."""
        if key not in self._modalities:
            from omni_ray.graphs.registry import graph_for
            try:
                model = self.config.stages[key].engine.model
                g = graph_for(model.path)
                mine = [n for n in g.nodes if n.engine == self.kinds[key]
                        and n.submodel == getattr(model, "submodel", None)]       # a thinker, not its talker
                out = sorted(g.outputs) if not mine or mine[-1] is g.nodes[-1] else [mine[-1].gives]
                if self.kinds[key] == "ar" and self._speaks(key):
                    out = sorted({*out, "audio"})
                self._modalities[key] = {"input": sorted(g.inputs), "output": out}
                self._requires[key] = g.requires
            except ConfigError:
                self._modalities[key] = self._requires[key] = None
        return self._modalities[key]

    def requires(self, key: str) -> frozenset | None:
        """The inputs the stage's checkpoint cannot go without (a subset of ``modalities``' input: Wan2.2
        TI2V takes an image, and makes a video from text alone too). None when not readable here."""
        self.modalities(key)
        return self._requires[key]

    def model_cards(self) -> list[dict]:
        return [self.model_card(k) for k in self.kinds if k not in self.inner]

    def model(self, model_id: str) -> dict:
        """The model object whose id (a served name; ids may contain '/') is ``model_id``; 404 otherwise.
        Encoder and speech stages serve no requests of their own: they are no models here."""
        for k in self.kinds:
            if self.names[k] == model_id and k not in self.inner:
                return self.model_card(k)
        served = sorted(n for k, n in self.names.items() if k not in self.inner)
        raise ModelNotFoundError(f"The model {model_id!r} does not exist; models: {served}",
                                 param="model", code="model_not_found")

    def stage(self, model: str | None, kind: str) -> str:
        """The stage key a ``model`` field names (served name or stage key); None = the first of ``kind``."""
        keys = [k for k, v in self.kinds.items() if v == kind and k not in self.inner]
        if model is None:
            if not keys:
                raise ModelNotFoundError(f"this app serves no {kind} model", param="model")
            return keys[0]
        for k in keys:
            if model in (k, self.names[k]):
                return k
        served = sorted(self.names[k] for k in keys)
        raise ModelNotFoundError(f"model {model!r} not found; available: {served}", param="model")

    def image_pipeline(self, model: str | None) -> tuple[str, PipelineConfig]:
        """Images come from a DiT stage (a one-step pipeline) or from a named pipeline ending in images.
        A DiT stage that only takes hidden states is reached through the pipeline that feeds it."""
        p = self.config.pipelines.get(model) if model else None
        if p is not None and p.steps[-1].output == "images":
            return model, p
        stage = self.stage(model, "dit")
        if "video" in ((self.modalities(stage) or {}).get("output") or []):
            raise InvalidRequestError(f"model {model!r} generates videos: use POST /v1/videos", param="model")
        feeds = [(n, p) for n, p in self.config.pipelines.items()
                 if p.steps[-1].stage == stage and p.steps[-1].input == "hidden_states"]
        direct = any(s.stage == stage and s.input != "hidden_states" for p in self.config.pipelines.values()
                     for s in p.steps)
        if feeds and not direct:
            return feeds[0]
        return self.names[stage], PipelineConfig(steps=[PipelineStep(stage=stage, input="prompt", output="images")])

    def edit_pipeline(self, model: str | None) -> tuple[str, PipelineConfig]:
        """The pipeline of an image edit (``/v1/images/edits``): as ``image_pipeline``, for a model that
        takes an input image (None: the first such pipeline); 400 for one that takes none."""
        edits = [n for n, p in self.config.pipelines.items() if p.image == "required"]
        if model is None:
            if not edits:
                raise ModelNotFoundError("this app serves no model that edits images", param="model")
            return edits[0], self.config.pipelines[edits[0]]
        name, pipe = self.image_pipeline(model)
        if pipe.image != "required":
            raise InvalidRequestError(f"model {model!r} takes no input image; models that edit images: {edits}",
                                      param="model")
        return name, pipe

    def speech_pipeline(self, model: str | None, param: str = "model") -> tuple[str, PipelineConfig]:
        """(name, pipeline) that speaks for ``model``: a pipeline's name whose last step outputs audio, or
        a chat model (AR stage: served name or key) whose speech pipeline that is (its first step runs that
        stage); None: the first speech pipeline. 400 naming ``param`` for a model that does not speak."""
        speech = {n: p for n, p in self.config.pipelines.items() if p.steps and p.steps[-1].output == "audio"}
        if model is not None and model in speech:
            return model, speech[model]
        if model is None and speech:
            return next(iter(speech.items()))
        stage = self.stage(model, "ar")                  # 404 for an unknown model
        for n, p in speech.items():
            if p.steps[0].stage == stage:
                return n, p
        speakers = sorted({self.names[p.steps[0].stage] for p in speech.values()})
        raise InvalidRequestError(f"model {self.names[stage]!r} has no speech output (no pipeline from it to "
                                  f"audio); models that speak: {speakers}", param=param)

    def _speaks(self, stage: str) -> bool:
        return any(p.steps and p.steps[0].stage == stage and p.steps[-1].output == "audio"
                   for p in self.config.pipelines.values())

    def voices(self, pipe: PipelineConfig) -> list[str] | None:
        """The voices of a speech pipeline (its checkpoint's ``spk_dict.pt``); None when not readable here
        (the token2wav stage still checks the voice)."""
        stage = pipe.steps[-1].stage
        if stage not in self._voices:
            try:
                from omni_ray.stages.voices import speech_voices

                self._voices[stage] = sorted(speech_voices(self.config.stages[stage].engine.model.path))
            except (ImportError, ConfigError, OSError):
                self._voices[stage] = None
        return self._voices[stage]

    def pipeline(self, name: str) -> PipelineConfig:
        if name not in self.config.pipelines:
            raise ModelNotFoundError(f"pipeline {name!r} not found; available: {sorted(self.config.pipelines)}",
                                     param="pipeline")
        return self.config.pipelines[name]

    def tool_parser(self, stage: str) -> str | None:
        """The tool-call parser of an AR stage (None: none); ``auto`` is its checkpoint's family's,
        read once from its config.json."""
        cache = self._tool_parsers
        if stage not in cache:
            name = self.config.stages[stage].tool_call_parser
            if name == "auto":
                from omni_ray.graphs.registry import architecture_of
                from omni_ray.tool_parsers import default_parser
                try:
                    name = default_parser(architecture_of(self.config.stages[stage].engine.model.path))
                except ConfigError:              # the checkpoint is not readable from here
                    name = None
            cache[stage] = None if name == "none" else name
        return cache[stage]
