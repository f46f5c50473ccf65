"""Stage graphs: which stages a checkpoint runs as, on which engine, and what passes between them.

    graph_for("/models/Qwen3-8B")            -> [llm: ar, prompt -> text]
    graph_for("tiny:pixart-llm")             -> [text_encoder: ar, prompt -> hidden_states,
                                                 denoiser: dit, hidden_states -> images]

A checkpoint is named by ``architectures[0]`` of its config.json (transformers) or
``_class_name`` of its model_index.json (diffusers). Adding a model family adds an entry
(``@register(...)`` in ``entries.py``), never a special case in the ingress.
"""

from omni_ray.graphs import entries as _entries  # noqa: F401  (registers today's families)
from omni_ray.graphs.expand import expand_pipelines
from omni_ray.graphs.graph import Handoff, Modality, StageGraph, StageNode
from omni_ray.graphs.registry import architecture_of, graph_for, register, registered

__all__ = ["Handoff", "Modality", "StageGraph", "StageNode", "architecture_of", "expand_pipelines", "graph_for",
           "register", "registered"]
