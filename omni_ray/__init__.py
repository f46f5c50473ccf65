"""omni-ray: serve multi-stage omni generative models (AR text + DiT image) on Ray."""

__version__ = "0.1.0"
