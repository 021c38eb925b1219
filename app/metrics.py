"""Prometheus metrics of the gateway; queue depth and worker counts are read from Redis per scrape."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.store import Store

logger = logging.getLogger(__name__)


class StoreCollector(Collector):
    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("dreamomni2_queue_depth", "Jobs waiting for a worker.")
        workers = GaugeMetricFamily("dreamomni2_workers", "Worker processes by state.", labels=["state"])
        try:
            depth.add_metric([], self.store.jobs.queue_depth())
            found = list(self.store.workers.workers())
            workers.add_metric(["up"], len(found))
            workers.add_metric(["ready"], sum(1 for w in found if w.get("ready")))
            workers.add_metric(["busy"], sum(1 for w in found if w.get("busy")))
        except Exception as exc:  # a scrape must not fail because Redis is briefly away
            logger.warning("metrics: Redis unavailable: %s", exc)
            return
        yield depth
        yield workers


class GatewayMetrics:
    def __init__(self, store: Store):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dreamomni2_http_requests_total", "HTTP requests by route, method and status.",
            ["route", "method", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "dreamomni2_http_request_seconds", "HTTP request latency by route and method.",
            ["route", "method"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.jobs_submitted = Counter(
            "dreamomni2_jobs_submitted_total", "Jobs accepted by the gateway, by task and adapter.",
            ["task", "adapter"], registry=self.registry,
        )  # fmt: skip
        self.jobs_rejected = Counter(
            "dreamomni2_jobs_rejected_total", "Submissions refused before queuing, by error code.",
            ["code"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(StoreCollector(store))

    def observe(self, route: str, method: str, status: int, started: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(time.perf_counter() - started)
