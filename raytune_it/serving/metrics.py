"""Prometheus metrics of one replica, exposed on GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120)


class ServeMetrics:
    def __init__(self, model_names: list[str]) -> None:
        # Labels only ever take served names: a client cannot grow the label set with made-up models.
        self.known = set(model_names)
        self.registry = CollectorRegistry()
        self.requests = Counter("raytune_it_requests", "HTTP requests by model and status code",
                                ["model", "status"], registry=self.registry)
        self.latency = Histogram("raytune_it_request_latency_seconds", "Generation latency",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("raytune_it_time_to_first_token_seconds", "Time to first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generated = Counter("raytune_it_generated_tokens", "Completion tokens generated", ["model"],
                                 registry=self.registry)
        self.rate = Gauge("raytune_it_tokens_per_second", "Generation rate of the latest request (batch size 1)",
                          ["model"], registry=self.registry)

    def observe(self, model: str, result) -> None:
        self.latency.labels(model).observe(result.latency_s)
        self.ttft.labels(model).observe(result.time_to_first_token_s)
        self.generated.labels(model).inc(result.completion_tokens)
        self.rate.labels(model).set(result.tokens_per_second)

    def count(self, model: str, status: int) -> None:
        self.requests.labels(model if model in self.known else "-", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
