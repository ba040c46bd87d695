"""The Serve app's metrics, as Ray metrics: right with any number of replicas.

Each ingress replica records through ``ray.serve.metrics`` (Ray tags every sample with its deployment,
replica and application), and Ray's metrics agent on every node exports them in Prometheus format with
Ray's own metrics; Prometheus scrapes every node through Ray's service discovery file, as for any Ray
cluster. ``GET /metrics`` on the app is a quick look without Prometheus: it reads every node's export and
sums the app's series over replicas and nodes (``cluster_metrics``). Ray prefixes the names with ``ray_``
(``ray_raytune_it_requests_total`` ...).

Every request is counted once, by route, model and status, at the ingress: 4xx answers and streams the
client abandoned (status 499, as nginx logs them) included. Time to first token is measured from the
request's arrival at the ingress, so queueing and routing count, as a client sees them.

The numbers lag: each process hands its samples to Ray's metrics agent once per Ray's metrics report
interval (``RAY_metrics_report_interval_ms``, 10 s by default), so a request shows in ``GET /metrics``
up to that long after its answer. The page says so in its first line and in the
``X-Metrics-Report-Interval-Seconds`` header.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
PREFIX = "raytune_it_"
# Labels that tell replicas, nodes and processes apart: summed over in GET /metrics.
PER_PROCESS_LABELS = {"replica", "deployment", "application", "instance", "SessionName", "Component", "NodeAddress",
                      "WorkerId", "JobId", "Version", "ip", "pid"}
CLIENT_CLOSED = 499
# The metric families, as Ray exports them (it prefixes custom metrics with "ray_"): dashboards query these.
FAMILIES = {f"ray_{PREFIX}{name}": kind for name, kind in [
    ("requests", "counter"), ("request_latency_seconds", "histogram"), ("time_to_first_token_seconds", "histogram"),
    ("time_per_output_token_seconds", "histogram"), ("generated_tokens", "counter")]}


class ServeMetrics:
    def __init__(self, model_names: list[str]) -> None:
        from ray.serve import metrics

        # Labels only ever take names that served a request: a client cannot grow the label set.
        self.known = set(model_names)
        self.requests = metrics.Counter(f"{PREFIX}requests", description="HTTP requests by route, model and status",
                                        tag_keys=("route", "model", "status"))  # type: ignore[arg-type]
        self.latency = metrics.Histogram(f"{PREFIX}request_latency_seconds", description="Arrival to last byte",
                                         boundaries=LATENCY_BUCKETS,
                                         tag_keys=("route", "model"))  # type: ignore[arg-type]
        self.ttft = metrics.Histogram(f"{PREFIX}time_to_first_token_seconds",
                                      description="Arrival to the first generated token, queueing included",
                                      boundaries=LATENCY_BUCKETS, tag_keys=("model",))
        self.tpot = metrics.Histogram(f"{PREFIX}time_per_output_token_seconds",
                                      description="Decode time per token after the first (batch-1 rate = 1/this)",
                                      boundaries=TOKEN_BUCKETS, tag_keys=("model",))
        self.generated = metrics.Counter(f"{PREFIX}generated_tokens", description="Completion tokens generated",
                                         tag_keys=("model",))

    def _model(self, model: str, status: int) -> str:
        if status == 200:
            self.known.add(model)
        return model if model in self.known else "-"

    def count(self, route: str, model: str, status: int, seconds: float) -> None:
        tags = {"route": route, "model": self._model(model, status)}
        self.requests.inc(1, tags={**tags, "status": str(status)})
        self.latency.observe(seconds, tags=tags)

    def observe(self, model: str, result: Any, time_to_first_token_s: float) -> None:
        tags = {"model": self._model(model, 200)}
        self.ttft.observe(time_to_first_token_s, tags=tags)
        self.generated.inc(result.completion_tokens, tags=tags)
        if result.completion_tokens > 1:
            self.tpot.observe(result.time_per_output_token_s, tags=tags)


INTERVAL_HEADER = "X-Metrics-Report-Interval-Seconds"


def report_interval_s() -> float:
    """How often Ray exports a process's metrics: the most a request may take to show in ``GET /metrics``."""
    from ray._raylet import Config  # type: ignore[attr-defined]  # (a Cython module)

    return Config.metrics_report_interval_ms() / 1000


async def cluster_metrics(timeout: float = 5.0) -> str:
    """The app's series from every node's Ray metrics export, summed over replicas and nodes."""
    import httpx
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    async with httpx.AsyncClient(timeout=timeout) as client:
        pages = await asyncio.gather(*(client.get(f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}")
                                       for n in nodes), return_exceptions=True)
    kinds: dict[str, tuple[str, str]] = {}
    sums: dict[tuple[str, tuple], float] = defaultdict(float)
    for page in pages:
        if isinstance(page, BaseException) or page.status_code != 200:
            continue  # a node gone or starting: the others still count
        for family in text_string_to_metric_families(page.text):
            if not family.name.removeprefix("ray_").startswith(PREFIX):
                continue
            kinds[family.name] = (family.type, family.documentation)
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                      if k not in PER_PROCESS_LABELS and not k.startswith("otel_scope")))
                sums[(sample.name, labels)] += sample.value
    lines = [f"# raytune-it: summed over every replica; a request shows here up to {report_interval_s():g} s after "
             "its answer (Ray exports metrics every RAY_metrics_report_interval_ms)"]
    for name, (kind, documentation) in sorted(kinds.items()):
        lines += [f"# HELP {name} {documentation}", f"# TYPE {name} {kind}"]
        for (series, labels), value in sorted(sums.items(), key=_series_order):
            if series == name or series.startswith(name + "_"):
                rendered = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{series}{{{rendered}}} {value:g}")
    return "\n".join(lines) + "\n"


def _series_order(item: tuple) -> tuple:
    """Series by name and labels, histogram buckets by their bound (``le``) as numbers."""
    (sample, labels), _ = item
    bound = dict(labels).get("le")
    return sample, tuple((k, v) for k, v in labels if k != "le"), float(bound) if bound is not None else 0.0
