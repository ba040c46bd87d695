"""Two replicas under load: 16 concurrent clients x 5 requests, no errors, and the app's metrics (Ray
metrics, summed over replicas by GET /metrics) count exactly what was sent, 4xx answers and a stream the
client abandoned included."""

import time

import httpx
import pytest

from helpers import concurrent_completions, free_port
from raytune_it.config import load_config

pytestmark = pytest.mark.integration
PROMPT = "### Instruction:\nConvert 4 hours to minutes.\n\n### Response:\n"


@pytest.fixture(scope="module")
def endpoint():
    import ray
    from ray import serve

    from raytune_it.serving.run import start

    port = free_port()
    config = load_config("tiny-lora", [f"serve.port={port}", "serve.model_name=tiny-llama", "serve.num_replicas=2",
                                       "serve.max_model_len=1024", "serve.max_tokens_limit=800",
                                       "serve.app_name=load-test"])
    ray.init(num_cpus=4, _metrics_export_port=free_port())
    url = start(config)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
    serve.shutdown()
    ray.shutdown()


def metric(text: str, name: str, **labels: str) -> float:
    """The summed value of a series in GET /metrics (Ray may prefix custom metric names with 'ray_')."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric_name, _, rest = series.partition("{")
        if metric_name.removeprefix("ray_") == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def wait_for_metrics(client, check, timeout: float = 90):
    """Ray exports metrics every few seconds: poll /metrics until ``check`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        text = client.get("/metrics").text
        if check(text):
            return text
        assert time.monotonic() < deadline, f"/metrics never added up:\n{text[-3000:]}"
        time.sleep(1)


def test_sixteen_clients_on_two_replicas_and_metrics_add_up(endpoint):
    failures = concurrent_completions(endpoint, clients=16, per_client=5, body={
        "model": "tiny-llama", "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert not failures, failures[:3]
    for body, status in [({"model": "tiny-llama"}, 400), ({"model": "nope", "prompt": "hi"}, 404)]:
        assert endpoint.post("/v1/completions", json=body).status_code == status
    with endpoint.stream("POST", "/v1/completions", json={"model": "tiny-llama", "prompt": PROMPT, "stream": True,
                                                          "max_tokens": 800, "temperature": 0}) as response:
        next(response.iter_lines())  # the stream started; leaving the block abandons it
    route = "/v1/completions"
    text = wait_for_metrics(endpoint, lambda t: (
        metric(t, "raytune_it_requests_total", route=route, model="tiny-llama", status="200") == 80
        and metric(t, "raytune_it_requests_total", route=route, status="499") == 1
        and metric(t, "raytune_it_requests_total", route=route, status="400") == 1
        and metric(t, "raytune_it_requests_total", route=route, status="404") == 1))
    assert metric(text, "raytune_it_generated_tokens_total", model="tiny-llama") == 80 * 6
    assert metric(text, "raytune_it_time_to_first_token_seconds_count", model="tiny-llama") == 80
    assert metric(text, "raytune_it_request_latency_seconds_count", route=route) == 83
    from raytune_it.serving.metrics import FAMILIES  # what dashboards query: exported under these names

    assert all(f"# TYPE {family} {kind}" in text for family, kind in FAMILIES.items())
    # The page says how far it may lag behind (Ray's metrics report interval), in a header and its first line.
    from ray._raylet import Config

    page = endpoint.get("/metrics")
    interval = Config.metrics_report_interval_ms() / 1000
    assert float(page.headers["X-Metrics-Report-Interval-Seconds"]) == interval
    assert f"up to {interval:g} s after" in page.text.splitlines()[0]
