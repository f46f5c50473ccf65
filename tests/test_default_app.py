"""The README's first command runs the default app on a fresh 2-core machine: Ray counts that many
logical CPUs, and a replica asking for more than is left never starts."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_default_app_fits_a_two_core_machine():
    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    cfg = doc["applications"][0]["args"]["config"]
    ingress = cfg["app"]["ingress"]
    total = ingress.get("num_cpus", 1) * ingress.get("num_replicas", 1)
    for name, stage in cfg["stages"].items():
        dep = stage.get("deployment", {})
        replicas = dep.get("autoscaling_config", {}).get("max_replicas", dep.get("num_replicas", 1))
        total += dep.get("num_cpus", 1) * replicas
    assert total <= 2.0, f"the default app asks for {total:.2f} logical CPUs; a 2-core machine has 2"
