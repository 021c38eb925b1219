# syntax=docker/dockerfile:1
# DreamOmni2 GPU worker: CUDA runtime base and the pinned model stack (`pip install '.[worker]'`, the set
# the tests install). On Linux, PyPI's torch==2.13.0 wheel is the CUDA 13.0 build (NVIDIA driver >= 580).
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t dreamomni2/worker .
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04's Python 3.12; the venv keeps pip away from the system packages (PEP 668). gcc, the libc
# headers and the Python headers are for the compiled speed profiles: Triton (Inductor's GPU kernels) builds
# a small launcher with the host C compiler at run time, which a CUDA runtime base image does not have.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/python -c "import os, shutil, sysconfig; assert shutil.which('gcc') and os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')), 'no C compiler or Python headers for Triton'" \
    && groupadd --system --gid 10001 dreamomni2 \
    && useradd --system --uid 10001 --gid dreamomni2 --create-home --home-dir /home/dreamomni2 dreamomni2 \
    && mkdir -p /models \
    && chown dreamomni2:dreamomni2 /models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/dreamomni2

# Dependencies first, in their own layer (torch and the CUDA libraries are gigabytes): exactly the pins
# of pyproject.toml's `dependencies`, `worker` and `gpu` extras. `gpu` is the torchvision built for that
# torch, so the translator's processor resizes with torchvision's kernel, as the reference's does. The
# build fails if torch is not a CUDA build or the processor would not use torchvision.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(p['dependencies'] + x['worker'] + x['gpu']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && python -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'" \
    && python -c "import torchvision, diffusers; from transformers.utils import is_torchvision_available as tv; assert tv(), 'torchvision unusable'"

COPY api_schemas/ api_schemas/
COPY app/ app/
COPY models/ models/
COPY workers/ workers/
# The client and its command line (`dreamomni2 status JOB` from inside a pod).
COPY dreamomni2/ dreamomni2/
RUN pip install --no-cache-dir --no-deps .

# Model caches on a volume: the Hugging Face cache (real weights) and the tiny preset. Expandable
# segments keep the allocator from fragmenting when the memory modes move models on and off the GPU.
# Logs as one JSON object per line (job_id, request_id, trace_id, worker where known).
ENV HF_HOME=/models/huggingface \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    DREAMOMNI2_CACHE_DIR=/models/dreamomni2 \
    DREAMOMNI2_LIVENESS_FILE=/tmp/dreamomni2-worker-alive \
    DREAMOMNI2_LOG_FORMAT=json
VOLUME ["/models"]
USER 10001:10001
# Prometheus metrics (DREAMOMNI2_METRICS_PORT).
EXPOSE 9101

# Healthy once the models are loaded, then while the heartbeat says the worker is not hung. Loading the
# real weights takes minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "-m", "workers.health"]

# SIGTERM (docker stop, Kubernetes) is Celery's warm shutdown: the running job finishes first, so give
# the container DREAMOMNI2_JOB_TIMEOUT_S (900 s) and a margin to stop (compose: stop_grace_period).
CMD ["python", "-m", "workers"]
