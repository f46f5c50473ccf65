"""Config errors name the path the user wrote, and every entry point takes the same files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omni_ray.config import OmniConfig, load_app_config, load_config, user_loc, validate
from omni_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def bare() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]["config"]


def error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate(OmniConfig, cfg)
    return e.value.message


def test_paths_leave_out_the_discriminated_unions_tag():
    cfg = bare()
    cfg["stages"]["llm"]["engine"]["scheduler"]["max_num_seqs"] = 0
    cfg["stages"]["image"]["engine"]["max_batch_size"] = 0
    msg = error(cfg)
    assert "stages.llm.engine.scheduler.max_num_seqs: Input should be greater than or equal to 1" in msg
    assert "stages.image.engine.max_batch_size:" in msg
    assert ".ar." not in msg and ".dit." not in msg


def test_a_plain_unions_alternatives_are_one_line():
    cfg = bare()
    cfg["stages"]["llm"]["deployment"]["num_replicas"] = "many"
    msg = error(cfg)
    assert msg.count("stages.llm.deployment.num_replicas:") == 1
    assert "num_replicas.int" not in msg and "literal" not in msg and " or Input should be 'auto'" in msg


def test_unknown_keys_and_the_stage_kind():
    cfg = bare()
    cfg["stages"]["llm"]["engine"]["max_num_seqs"] = 8            # belongs under engine.scheduler
    assert "stages.llm.engine.max_num_seqs: Extra inputs are not permitted" in error(cfg)
    cfg = bare()
    del cfg["stages"]["llm"]["kind"]
    assert error(cfg) == "invalid OmniConfig: stages.llm.kind: required: one of 'ar', 'dit', 'encoder'"
    cfg["stages"]["llm"]["kind"] = "gan"
    assert error(cfg) == "invalid OmniConfig: stages.llm.kind: 'gan' is not one of 'ar', 'dit', 'encoder'"


def test_model_checks_name_their_own_path_without_pydantics_prefix():
    cfg = bare()
    cfg["pipelines"]["text2image"]["steps"][1]["stage"] = "nope"
    assert error(cfg) == "invalid OmniConfig: pipelines.text2image.steps.1.stage: unknown stage 'nope'"


def test_user_loc_walks_lists_and_dicts():
    loc, _ = user_loc(OmniConfig, ("pipelines", "p", "steps", 0, "output"))
    assert loc == ("pipelines", "p", "steps", 0, "output")
    loc, _ = user_loc(OmniConfig, ("stages", "x", "dit", "deployment", "autoscaling", "max_replicas"))
    assert loc == ("stages", "x", "deployment", "autoscaling", "max_replicas")


# ----------------------------------------------------------------------------- one file, every entry point
def test_build_app_takes_a_serve_config_file_or_a_bare_omni_config(tmp_path):
    from deployments.app import resolve_config

    whole = resolve_config({"config_path": str(ROOT / "serve_config.yaml")})
    assert isinstance(whole, OmniConfig) and set(whole.stages) == set(bare()["stages"]) >= {"llm", "image"}
    bare_file = tmp_path / "omni.yaml"
    bare_file.write_text(yaml.safe_dump(bare()))
    assert resolve_config({"config_path": str(bare_file)}) == whole == load_app_config(str(ROOT / "serve_config.yaml"))
    assert load_config(str(bare_file)) == whole


def test_a_file_that_is_neither_is_told_what_was_expected(tmp_path):
    from deployments.app import resolve_config

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"proxy_location": "HeadOnly", "http_options": {"port": 8000}}))
    with pytest.raises(ConfigError) as e:
        resolve_config({"config_path": str(other)})
    assert "expected an OmniConfig (top-level `stages:`) or a Serve config file (top-level `applications:`)" \
        in e.value.message and "http_options" in e.value.message and str(other) in e.value.message
    with pytest.raises(ConfigError) as e:
        resolve_config({"config_path": str(ROOT / "serve_config.yaml"), "app_name": "nope"})
    assert "no application 'nope'" in e.value.message
