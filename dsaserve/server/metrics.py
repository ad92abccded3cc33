"""Prometheus metrics of the server, in their own registry (several servers can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for app.py)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class ServerMetrics:
    """All metrics the server exports at /metrics (prefix ``dsaserve_``)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram("dsaserve_time_to_first_token_seconds", "Request arrival to first generated token",
                              labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("dsaserve_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("dsaserve_e2e_request_latency_seconds", "Request arrival to finish", labels,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.waiting = Gauge("dsaserve_num_requests_waiting", "Requests queued in the scheduler (queue length)",
                             labels, registry=r).labels(model_name)
        self.running = Gauge("dsaserve_num_requests_running", "Requests being prefilled or decoded", labels,
                             registry=r).labels(model_name)
        self.waiting.set(0)
        self.running.set(0)
        self.prompt_tokens = Counter("dsaserve_prompt_tokens", "Prompt tokens admitted (tokens in)", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("dsaserve_generation_tokens", "Generated tokens (tokens out)", labels,
                                         registry=r).labels(model_name)
        self._finished = Counter("dsaserve_request_success", "Requests that finished, by finish reason",
                                 labels + ["finished_reason"], registry=r)
        self._failed = Counter("dsaserve_request_failure", "Requests that ended with an error, by kind",
                               labels + ["kind"], registry=r)
        self._aborted = Counter("dsaserve_request_aborted", "Requests cancelled because the client went away",
                                labels, registry=r).labels(model_name)
        self.engine_healthy = Gauge("dsaserve_engine_healthy", "1 while the engine is healthy", labels,
                                    registry=r).labels(model_name)
        self.engine_healthy.set(1)
        self._model_name = model_name

    def track_queues(self, num_waiting: Callable[[], int], num_running: Callable[[], int]) -> None:
        """Read the scheduler's queue lengths when /metrics is scraped (so they are right during a step)."""
        self.waiting.set_function(num_waiting)
        self.running.set_function(num_running)

    def finished(self, reason: str) -> None:
        """A request that completed (stop / length); aborted ones go to ``aborted``."""
        self._finished.labels(self._model_name, reason).inc()

    def aborted(self) -> None:
        self._aborted.inc()

    def failed(self, kind: str) -> None:
        self._failed.labels(self._model_name, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
