"""Stage graphs: a checkpoint's class names its stages, engines and hand-offs."""

import json

import pytest

from omni_ray.config import OmniConfig, load_app_config, validate
from omni_ray.errors import ConfigError
from omni_ray.graphs import StageGraph, StageNode, architecture_of, expand_pipelines, graph_for, register, registered


@pytest.mark.parametrize("spec", ["tiny:qwen3", "tiny:qwen2", "tiny:llama"])
def test_causal_lms_are_one_ar_stage(spec):
    g = graph_for(spec)
    assert g.architecture == architecture_of(spec)
    assert [(n.role, n.engine, n.takes, n.gives) for n in g.nodes] == [("llm", "ar", "prompt", "text")]


def test_vision_language_is_one_ar_stage():
    g = graph_for("tiny:qwen2.5-vl")
    assert g.architecture == architecture_of("tiny:qwen2.5-vl")
    assert [(n.role, n.engine, n.takes, n.gives) for n in g.nodes] == [("llm", "ar", "prompt", "text")]


def test_qwen2_5_omni_is_thinker_talker_token2wav():
    """The whole Omni checkpoint: three stages on one directory, text and audio out; its thinker-only
    checkpoint (or one saved without the talker) stays text out."""
    g = graph_for("tiny:qwen2.5-omni")
    assert g.architecture == "Qwen2_5OmniForConditionalGeneration"
    assert [(n.role, n.engine, n.takes, n.gives, n.submodel) for n in g.nodes] == [
        ("thinker", "ar", "prompt", "text", None), ("talker", "ar", "text", "codec_tokens", "talker"),
        ("token2wav", "dit", "codec_tokens", "audio", None)]
    assert g.inputs == {"text", "image", "audio"} and g.outputs == {"text", "audio"}
    from omni_ray.graphs.entries import omni_speech, omni_thinker

    thinker_only = omni_thinker({"architectures": ["Qwen2_5OmniThinkerForConditionalGeneration"]})
    assert thinker_only.roles == ("thinker",) and thinker_only.outputs == {"text"}
    assert omni_speech({"architectures": ["Qwen2_5OmniForConditionalGeneration"],
                        "enable_audio_output": False}).roles == ("thinker",)


def test_speech_graph_pipeline_checks_its_stages():
    ar = {"device": "cpu", "enforce_eager": True}
    stages = {"thinker": {"kind": "ar", "engine": {"model": {"path": "tiny:qwen2.5-omni"}} | ar},
              "talker": {"kind": "ar", "engine": {"model": {"path": "tiny:qwen2.5-omni", "submodel": "talker"}} | ar},
              "t2w": {"kind": "dit", "engine": {"model": {"path": "tiny:qwen2.5-omni"}, "device": "cpu"}}}
    graph = {"model": "thinker", "stages": {"talker": "talker", "token2wav": "t2w"}}
    cfg = expand_pipelines(validate(OmniConfig, {"stages": stages, "pipelines": {"omni": {"graph": graph}}}))
    assert [(s.stage, s.input, s.output) for s in cfg.pipelines["omni"].steps] == [
        ("thinker", "prompt", "text"), ("talker", "text", "codec_tokens"), ("t2w", "codec_tokens", "audio")]
    swapped = {"model": "thinker", "stages": {"talker": "thinker", "token2wav": "t2w"}}
    with pytest.raises(ConfigError, match="submodel"):
        expand_pipelines(validate(OmniConfig, {"stages": stages, "pipelines": {"omni": {"graph": swapped}}}))
    with pytest.raises(ConfigError, match="codec_tokens come from a talker"):       # steps written by hand
        validate(OmniConfig, {"stages": stages, "pipelines": {"p": {"steps": [
            {"stage": "thinker"}, {"stage": "thinker", "input": "text", "output": "codec_tokens"}]}}})


def test_text_to_image_with_and_without_its_own_text_encoder():
    own = graph_for("tiny:pixart")
    assert [(n.role, n.engine, n.takes, n.gives) for n in own.nodes] == [("denoiser", "dit", "prompt", "images")]
    assert own.outputs == {"image"}
    llm_cond = graph_for("tiny:pixart-llm")          # text_encoder: [null, null] in model_index.json
    assert [(n.role, n.engine, n.takes, n.gives) for n in llm_cond.nodes] == [
        ("text_encoder", "ar", "prompt", "hidden_states"), ("denoiser", "dit", "hidden_states", "images")]
    assert graph_for("tiny:sd3").roles == ("denoiser",)


def test_wan_graphs_take_the_first_frame_their_checkpoint_takes():
    """Wan2.1 I2V needs an image, T2V takes none, Wan2.2 TI2V (expand_timesteps) takes one or none."""
    for spec, inputs, requires in [("tiny:wan2.1-t2v", {"text"}, {"text"}),
                                   ("tiny:wan2.1-i2v", {"text", "image"}, {"text", "image"}),
                                   ("tiny:wan2.2-ti2v", {"text", "image"}, {"text"})]:
        g = graph_for(spec)
        assert (g.roles, g.inputs, g.requires, g.outputs) == (("denoiser",), inputs, requires, {"video"}), spec
    # their pipelines: the image required, refused, or taken when given
    assert [graph_for(s).pipeline({"denoiser": "v"}).image for s in ("tiny:wan2.1-t2v", "tiny:wan2.1-i2v",
                                                                     "tiny:wan2.2-ti2v")] == \
        ["none", "required", "optional"]


def test_a_pipeline_checks_its_input_image():
    from omni_ray.config import PipelineConfig, PipelineStep
    from omni_ray.errors import InvalidRequestError
    from omni_ray.runner import check_image

    step = [PipelineStep(stage="v", input="prompt", output="videos")]
    for image, ok in (("none", (False,)), ("optional", (False, True)), ("required", (True,))):
        for given in (False, True):
            pipe = PipelineConfig(steps=step, image=image)
            if given in ok:
                check_image("p", pipe, object() if given else None)
            else:
                with pytest.raises(InvalidRequestError) as err:
                    check_image("p", pipe, object() if given else None)
                assert err.value.param == "image"


def test_the_default_apps_graph_pipelines_expand_to_their_steps():
    cfg = load_app_config("serve_config.yaml")
    assert cfg.pipelines["chat"].graph is not None and not cfg.pipelines["chat"].steps
    pipes = expand_pipelines(cfg).pipelines

    def steps(name):
        return [(s.stage, s.input, s.output) for s in pipes[name].steps]

    assert steps("chat") == [("llm", "prompt", "text")]
    assert steps("image") == [("image", "prompt", "images")]
    assert steps("text2image-llm-encoder") == [("llm", "prompt", "hidden_states"),
                                               ("image-llm", "hidden_states", "images")]
    assert pipes["text2image"] == cfg.pipelines["text2image"]          # written as steps: unchanged
    assert pipes["text2image-llm-encoder"].description == cfg.pipelines["text2image-llm-encoder"].description
    assert pipes["chat"].description == "Qwen3ForCausalLM: llm (ar)"            # none given: the graph's


def _with_pipeline(pipe: dict):
    raw = load_app_config("serve_config.yaml").model_dump()
    raw["pipelines"] = {"p": pipe}
    return validate(OmniConfig, raw)


@pytest.mark.parametrize("pipe,match", [
    ({"graph": {"model": "image-llm"}}, r"name a stage for each of \['text_encoder', 'denoiser'\]"),
    ({"graph": {"model": "image-llm", "stages": {"encoder": "llm"}}}, r"has no role \['encoder'\]"),
    ({"graph": {"model": "image-llm", "stages": {"text_encoder": "image"}}},
     "role text_encoder of PixArtSigmaPipeline runs on the ar engine; stage 'image' is dit"),
    ({"graph": {"model": "llm", "stages": {"llm": "image"}}}, "role llm .* runs on the ar engine"),
])
def test_graph_pipelines_that_cannot_run_name_the_field(pipe, match):
    with pytest.raises(ConfigError, match="pipelines.p.graph"):
        expand_pipelines(_with_pipeline(pipe))
    with pytest.raises(ConfigError, match=match):
        expand_pipelines(_with_pipeline(pipe))


def test_a_pipeline_is_steps_or_a_graph():
    with pytest.raises(ConfigError, match="give either steps or graph"):
        _with_pipeline({"graph": {"model": "llm"}, "steps": [{"stage": "llm"}]})
    with pytest.raises(ConfigError, match="give either steps or graph"):
        _with_pipeline({})
    with pytest.raises(ConfigError, match="pipelines.p.graph.stages.text_encoder: unknown stage 'nope'"):
        _with_pipeline({"graph": {"model": "image-llm", "stages": {"text_encoder": "nope"}}})


def test_a_graph_needs_a_stage_for_each_role():
    with pytest.raises(ConfigError, match="text_encoder"):
        graph_for("tiny:pixart-llm").pipeline({"denoiser": "image-llm"})


def test_hand_offs_must_chain():
    with pytest.raises(ValueError, match="gives text"):
        StageGraph("X", (StageNode("a", "ar", "prompt", "text"), StageNode("b", "dit", "hidden_states", "images")))
    with pytest.raises(ValueError, match="takes the prompt"):
        StageGraph("X", (StageNode("a", "dit", "text", "images"),))


def test_unknown_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="neither model_index.json nor config.json"):
        graph_for(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ConfigError, match="MambaForCausalLM has no stage graph"):
        graph_for(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        graph_for(tmp_path)


def test_register_adds_an_entry_once(tmp_path, monkeypatch):
    from omni_ray.graphs import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))   # this test's entry goes with it

    @register("TestOnlyForCausalLM")
    def one(cfg):
        return StageGraph("TestOnlyForCausalLM", (StageNode("llm", "ar", "prompt", "text"),))

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["TestOnlyForCausalLM"]}))
    assert "TestOnlyForCausalLM" in registered() and graph_for(tmp_path).roles == ("llm",)
    with pytest.raises(ValueError, match="twice"):
        register("TestOnlyForCausalLM")(one)


@pytest.mark.parametrize("spec,edit", [("tiny:qwen-image", False), ("tiny:qwen-image-edit", True)])
def test_qwen_image_is_a_text_encoder_on_the_ar_engine_then_the_dit(spec, edit):
    g = graph_for(spec)
    assert g.architecture == ("QwenImageEditPipeline" if edit else "QwenImagePipeline")
    assert [(n.role, n.engine, n.takes, n.gives, n.component) for n in g.nodes] == [
        ("text_encoder", "ar", "prompt", "hidden_states", "text_encoder"),
        ("denoiser", "dit", "hidden_states", "images", None)]
    assert g.requires == g.inputs == ({"text", "image"} if edit else {"text"}) and g.outputs == {"image"}
    pipe = g.pipeline({"text_encoder": "enc", "denoiser": "dit"})
    assert [(s.stage, s.encoding) for s in pipe.steps] == [("enc", g.architecture), ("dit", None)]
    assert pipe.image == ("required" if edit else "none")


def test_the_default_apps_qwen_image_pipelines():
    pipes = expand_pipelines(load_app_config("serve_config.yaml")).pipelines
    for name in ("qwen-image", "qwen-image-edit"):
        assert [(s.stage, s.input, s.output) for s in pipes[name].steps] == [
            (f"{name}-encoder", "prompt", "hidden_states"), (name, "hidden_states", "images")]
    assert pipes["qwen-image"].steps[0].encoding == "QwenImagePipeline" and pipes["qwen-image"].image == "none"
    assert pipes["qwen-image-edit"].steps[0].encoding == "QwenImageEditPipeline"
    assert pipes["qwen-image-edit"].image == "required"


def test_a_text_encoder_role_loads_the_same_checkpoint():
    raw = load_app_config("serve_config.yaml").model_dump()
    raw["pipelines"] = {"p": {"graph": {"model": "qwen-image", "stages": {"text_encoder": "llm"}}}}
    with pytest.raises(ConfigError, match="role text_encoder of QwenImagePipeline loads text_encoder/ of the "
                                          "checkpoint 'tiny:qwen-image'; stage 'llm' loads 'tiny:qwen3'"):
        expand_pipelines(validate(OmniConfig, raw))
