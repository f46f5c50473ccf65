"""KubeRay manifests for omni-ray and the generator that writes them (python -m cluster_configs.generate)."""
