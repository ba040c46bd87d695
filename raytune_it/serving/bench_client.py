"""``raytune-it bench-serve``: the endpoint's numbers measured from outside, over HTTP.

Streams each completion so the client sees its own time to first token; the
server's usage block gives the engine's view for comparison.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def one_request(client: Any, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion's numbers, or ``{"error": ...}`` for an error answer or a lost connection."""
    import httpx

    try:
        return _timed_request(client, url, model, prompt, max_tokens)
    except httpx.TransportError as exc:  # the endpoint went away mid-run: counted, the run goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def _timed_request(client: Any, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    usage: dict = {}
    with client.stream("POST", f"{url}/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}) as resp:
        if resp.status_code != 200:
            resp.read()
            return {"error": f"HTTP {resp.status_code}: {resp.text[:200]}"}
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                return {"error": payload["error"].get("message", "stream error")}
            if first is None and payload["choices"][0].get("text"):
                first = time.perf_counter()
            usage = payload.get("usage") or usage
    ended = time.perf_counter()
    tokens = usage.get("completion_tokens", 0)
    return {"latency_s": ended - started, "ttft_s": (first or ended) - started,
            "client_tokens_per_second": ((tokens - 1) / (ended - first)
                                         if first and tokens > 1 and ended > first else 0.0),
            "server_tokens_per_second": usage.get("tokens_per_second", 0.0), "completion_tokens": tokens}


def bench(url: str, model: str, n: int, prompt: str, max_tokens: int, concurrency: int = 1,
          api_key: str | None = None) -> dict:
    import httpx

    from raytune_it.errors import UserError

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        try:  # an endpoint that is not there is one error, not n tracebacks or n failed requests
            client.get(f"{url.rstrip('/')}/v1/models", timeout=30)
        except httpx.TransportError as exc:
            raise UserError(f"--url {url}: cannot reach the endpoint ({type(exc).__name__}: {exc}). Start it with "
                            "'raytune-it serve CONFIG', or pass its address with --url.") from None
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda _: one_request(client, url.rstrip("/"), model, prompt, max_tokens),
                                    range(n)))
    wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    latency = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok]
    return {
        "requests": n, "errors": len(errors), "error_examples": errors[:3], "concurrency": concurrency,
        "latency_p50_s": _percentile(latency, 0.5), "latency_p95_s": _percentile(latency, 0.95),
        "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
        "tokens_per_second_client": statistics.median([r["client_tokens_per_second"] for r in ok]) if ok else 0.0,
        "tokens_per_second_server": statistics.median([r["server_tokens_per_second"] for r in ok]) if ok else 0.0,
        "completion_tokens_mean": statistics.mean([r["completion_tokens"] for r in ok]) if ok else 0.0,
        "aggregate_tokens_per_second": sum(r["completion_tokens"] for r in ok) / wall if wall > 0 else 0.0,
    }
