"""KubeRay manifests and serve configs, checked offline and strictly (unknown keys fail).

CRDs: cluster_configs/crds (KubeRay v1.7.0, vendored). Serve: Ray's ServeDeploySchema plus a walk
over its pydantic fields (Ray itself drops unknown keys). Each app's args.config: OmniConfig.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster_configs import generate
from cluster_configs.sizing import SizingError, parse_ray_resources, worker_bounds
from cluster_configs.validate import crd_errors, crd_schema, unknown_keys, validate_serve_config
from omni_ray.config import OmniConfig
from omni_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "cluster_configs" / "crds"
MANIFESTS = {"rayservice.yaml": "ray.io_rayservices.yaml", "raycluster.yaml": "ray.io_rayclusters.yaml"}
SERVE_CONFIGS = ["serve_config.yaml", "serve_config.gpu.yaml"]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    return {m: crd_schema(CRDS / crd) for m, crd in MANIFESTS.items()}


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _load(ROOT / "cluster_configs" / "rayservice.yaml")


def _cluster(manifest: dict) -> dict:
    return manifest["spec"].get("rayClusterConfig", manifest["spec"])


# ----------------------------------------------------------------------------- CRD schemas
@pytest.mark.parametrize("name", list(MANIFESTS))
def test_manifest_matches_kuberay_crd(name, schemas):
    manifest = _load(ROOT / "cluster_configs" / name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert crd_errors(manifest, schemas[name]) == []


@pytest.mark.parametrize("where", ["spec", "headGroupSpec", "container", "workerGroup"])
def test_unknown_manifest_field_is_rejected(where, schemas, rayservice):
    bad = copy.deepcopy(rayservice)
    cluster = _cluster(bad)
    target = {"spec": bad["spec"], "headGroupSpec": cluster["headGroupSpec"],
              "container": cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
              "workerGroup": cluster["workerGroupSpecs"][0]}[where]
    target["replicaz"] = 1
    errors = crd_errors(bad, schemas["rayservice.yaml"])
    assert len(errors) == 1 and "'replicaz' was unexpected" in errors[0]


def test_wrong_type_is_rejected(schemas, rayservice):
    bad = copy.deepcopy(rayservice)
    _cluster(bad)["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in crd_errors(bad, schemas["rayservice.yaml"]))


# ----------------------------------------------------------------------------- Serve configs
def test_serve_config_v2_is_a_strict_serve_config(rayservice):
    doc = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (cfg,) = validate_serve_config(doc)
    assert isinstance(cfg, OmniConfig)
    assert doc["http_options"]["port"] == generate.SERVE_PORT and doc["http_options"]["host"] == "0.0.0.0"
    assert doc["applications"][0]["import_path"] == "deployments.app:build_app"


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_repo_serve_config_is_strict(name):
    configs = validate_serve_config(_load(ROOT / name))
    assert configs and all(isinstance(c, OmniConfig) for c in configs)


@pytest.mark.parametrize("path", [
    ("http_options", "hots"),
    ("applications", 0, "import_pth"),
    ("applications", 0, "deployments", 0, "num_replica"),
    ("applications", 0, "deployments", 0, "autoscaling_config", "max_replica"),
    ("applications", 0, "deployments", 0, "ray_actor_options", "num_gpu"),
])
def test_unknown_serve_key_is_rejected(path):
    doc = _load(ROOT / "serve_config.yaml")
    doc["applications"][0]["deployments"] = [
        {"name": "llm", "autoscaling_config": {"min_replicas": 1}, "ray_actor_options": {"num_cpus": 1}}]
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    want = ".".join(map(str, path))
    assert unknown_keys(doc, _serve_schema()) == [want]
    with pytest.raises(ValueError, match=re.escape(want)):
        validate_serve_config(doc)


def _serve_schema():
    from ray.serve.schema import ServeDeploySchema
    return ServeDeploySchema


def test_unknown_omni_config_key_is_rejected():
    doc = _load(ROOT / "serve_config.gpu.yaml")
    doc["applications"][0]["args"]["config"]["stages"]["llm"]["deployment"]["autoscaling"]["max_replica"] = 8
    with pytest.raises(ConfigError, match="stages.llm.*max_replica"):
        validate_serve_config(doc)


# ----------------------------------------------------------------------------- generator
def test_manifests_do_not_drift():
    files = generate.render()
    assert set(files) == set(MANIFESTS)
    for name, text in files.items():
        drifted = f"{name} drifted: run python -m cluster_configs.generate"
        assert (ROOT / "cluster_configs" / name).read_text() == text, drifted


def test_serve_config_v2_carries_the_gpu_config_verbatim(rayservice):
    src = _load(ROOT / "serve_config.gpu.yaml")
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert embedded["applications"] == src["applications"]


def test_check_mode_fails_on_drift(tmp_path):
    cmd = [sys.executable, "-m", "cluster_configs.generate", "--check"]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rendered = generate.render()
    n = int(re.search(r"maxReplicas: (\d+)", next(iter(rendered.values()))).group(1))   # a worker group's bound
    for name, text in rendered.items():
        (tmp_path / name).write_text(text.replace(f"maxReplicas: {n}", f"maxReplicas: {n + 1}"))
    drift = subprocess.run(cmd + ["--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert drift.returncode == 1 and f"+      maxReplicas: {n}" in drift.stdout


# ----------------------------------------------------------------------------- consistency
def test_worker_groups_follow_stage_autoscaling(rayservice):
    doc = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    cfg = validate_serve_config(doc)[0]
    groups = {g["groupName"]: g for g in _cluster(rayservice)["workerGroupSpecs"]}
    for name, stage in cfg.stages.items():
        d = stage.deployment
        assert d.num_gpus >= 1 and d.resources, f"{name} must pin itself to a GPU group"
        (owner,) = [g for g in groups.values()
                    if set(d.resources) <= set(parse_ray_resources(g["rayStartParams"].get("resources", "{}")))]
        gpus = int(owner["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        per_pod = gpus // int(d.num_gpus)
        assert owner["maxReplicas"] * per_pod >= d.autoscaling.max_replicas
        assert owner["minReplicas"] * per_pod >= d.autoscaling.min_replicas


def test_sizing_rejects_a_resource_no_group_offers(rayservice):
    cfg = validate_serve_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))[0]
    bad = cfg.model_copy(deep=True)
    bad.stages["image"].deployment.resources = {"tpu_v9": 1}
    with pytest.raises(SizingError, match="image.*tpu_v9"):
        worker_bounds(bad, _cluster(rayservice))


def test_sizing_rejects_a_replica_bigger_than_a_pod(rayservice):
    cfg = validate_serve_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))[0]
    bad = cfg.model_copy(deep=True)
    bad.stages["llm"].deployment.num_gpus = 2
    with pytest.raises(SizingError, match="llm.*does not fit"):
        worker_bounds(bad, _cluster(rayservice))


def test_image_and_ray_version_match_the_dockerfile(rayservice):
    dockerfile = (ROOT / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    project_version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for name in MANIFESTS:
        cluster = _cluster(_load(ROOT / "cluster_configs" / name))
        assert cluster["rayVersion"] == ray_version
        pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
        assert images == {f"omni-ray:{project_version}"}


def test_stage_options_carry_the_custom_resources(rayservice):
    """The manifests pin stages to worker groups through ``deployment.resources``; the Serve
    options built from the config must ask Ray for them (else the autoscaler grows any group)."""
    from deployments.options import stage_options

    cfg = validate_serve_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))[0]
    for name, stage in cfg.stages.items():
        opts = stage_options(name, stage)
        assert opts["name"] == name
        assert opts["ray_actor_options"].get("resources") == stage.deployment.resources
        assert opts["ray_actor_options"]["num_gpus"] == stage.deployment.num_gpus
