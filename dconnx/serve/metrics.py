"""Prometheus metrics of one server (its own registry, so several apps in a process stay apart)."""
from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
        disable_created_metrics()     # no *_created series next to every counter and histogram
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dconnx_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("dconnx_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_samples = Histogram("dconnx_batch_size", "samples per onnxruntime call",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("dconnx_batch_requests", "requests merged into one onnxruntime call",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("dconnx_inference_seconds", "duration of one onnxruntime call",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.samples = Counter("dconnx_samples", "samples run through the model", registry=r)
        self.queue_depth = Gauge("dconnx_queue_depth", "requests waiting for a batch", registry=r)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, samples: int, requests: int, seconds: float) -> None:
        self.batch_samples.observe(samples)
        self.batch_requests.observe(requests)
        self.inference.observe(seconds)
        self.samples.inc(samples)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
