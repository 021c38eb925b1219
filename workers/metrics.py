"""Prometheus metrics of a worker process, served on its own port."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

JOBS = Counter(
    "dreamomni2_worker_jobs_total",
    "Jobs a worker finished, by task, adapter and outcome.",
    ["task", "adapter", "outcome"],
)
QUEUE_WAIT = Histogram(
    "dreamomni2_queue_wait_seconds", "Time from submit to a worker starting the job.", buckets=STAGE_BUCKETS
)
STAGE_SECONDS = Histogram(
    "dreamomni2_stage_seconds", "Time per job stage (translate, encode, denoise, decode, total).", ["stage"],
    buckets=STAGE_BUCKETS,
)  # fmt: skip
WORKER_READY = Gauge("dreamomni2_worker_ready", "1 once this worker's models are loaded and it takes jobs.")
REQUEUED = Counter("dreamomni2_jobs_requeued_total", "Jobs requeued because their worker stopped responding.")
RESENT = Counter(
    "dreamomni2_job_messages_resent_total",
    "Queued jobs whose queue message was gone (never sent, or taken by a dying worker) and was sent again.",
)
GPU_PEAK_BYTES = Gauge(
    "dreamomni2_worker_gpu_peak_bytes",
    "GPU memory per device: the last job's peak as PyTorch saw it (allocated, reserved), and the "
    "memory planner's prediction for a job at the image limit (planned).",
    ["device", "kind"],
)
MODEL_LOAD_SECONDS = Gauge(
    "dreamomni2_worker_model_load_seconds", "How long this worker took to load its models."
)
