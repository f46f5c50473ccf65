# omni-ray serving image: CUDA runtime, Python 3.12, omni-ray installed with `pip install .`.
# Model weights are mounted at run time (/models on Kubernetes), never baked in or downloaded.
#
#   docker build -t omni-ray:0.1.0 .
#   docker tag omni-ray:0.1.0 <registry>/omni-ray:0.1.0 && docker push <registry>/omni-ray:0.1.0
#   python -m cluster_configs.generate --image <registry>/omni-ray:0.1.0   # point the manifests at it
#
# RAY_VERSION must equal rayVersion in cluster_configs/cluster.template.yaml.
# The PyPI torch wheel brings its own CUDA libraries; for an older driver, install torch from
# a matching index first: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# wget: KubeRay's readiness/liveness probes. gcc + Python headers: Triton compiles its
# kernel launchers at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.12 python3.12-venv python3.12-dev gcc libc6-dev wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv \
 && pip install --upgrade pip

RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"; fi

WORKDIR /opt/omni-ray
COPY pyproject.toml README.md constraints.txt ./
COPY omni_ray ./omni_ray
COPY deployments ./deployments
RUN pip install -c constraints.txt . "ray[serve]==${RAY_VERSION}" \
 && python -c "import omni_ray, deployments, ray; print('ray', ray.__version__)"

# The serve configs, for `serve run` inside a RayCluster (models still come from /models).
COPY serve_config.yaml serve_config.gpu.yaml ./

# Ray's images run as uid 1000 `ray`; ubuntu 24.04 ships uid 1000 as `ubuntu`, so replace it.
RUN (userdel --remove ubuntu 2>/dev/null || true) && useradd --create-home --uid 1000 ray
USER ray
WORKDIR /home/ray
EXPOSE 6379 8000 8265 10001
CMD ["bash"]
