# syntax=docker/dockerfile:1
# DreamOmni2 gateway: FastAPI + Celery client, no torch (`pip install .`: the base dependencies only).
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t dreamomni2/gateway .
# The same image runs the webhook delivery worker (`python -m workers.webhooks`: Celery, no torch, no
# port); the HEALTHCHECK below is the gateway's, so compose turns it off for that service.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 dreamomni2 \
    && useradd --system --uid 10001 --gid dreamomni2 --no-create-home --shell /usr/sbin/nologin dreamomni2

WORKDIR /srv/dreamomni2

# Dependencies first, in their own layer: exactly the pins of pyproject.toml's `dependencies`.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY api_schemas/ api_schemas/
COPY app/ app/
COPY models/ models/
COPY workers/ workers/
# The client and its command line (`dreamomni2 status JOB` from inside a pod).
COPY dreamomni2/ dreamomni2/
RUN pip install --no-cache-dir --no-deps .

# Logs as one JSON object per line (job_id, request_id, trace_id where known), for a log pipeline.
ENV DREAMOMNI2_HOST=0.0.0.0 \
    DREAMOMNI2_PORT=8000 \
    DREAMOMNI2_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8000

# /healthz depends on nothing (not even Redis): it fails only when the process cannot serve.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DREAMOMNI2_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "app", "serve"]
