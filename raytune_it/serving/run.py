"""``raytune-it serve``: deploy the application and serve until Ctrl-C, then shut down cleanly."""

from __future__ import annotations

import time
from typing import Any

from raytune_it.config.schema import JobConfig
from raytune_it.storage import folder_name, redact_uri


def start(config: JobConfig) -> str:
    """Deploy on the current Ray (Serve's HTTP proxy on serve.host:serve.port); return the base URL."""
    from ray import serve

    from raytune_it.serving.app import build_app

    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(build_app(config), name=config.serve.app_name, route_prefix="/")
    return f"http://{config.serve.host}:{config.serve.port}"


def serve_forever(config: JobConfig, console: Any = None) -> None:
    from rich.console import Console

    from raytune_it.cluster import ray_session
    from raytune_it.serving.app import check_paths

    console = console or Console()
    check_paths(config)  # a missing model or adapter is named now, not after Ray and Serve have started
    with ray_session(min_cpus=config.serve.num_replicas * config.serve.cpus_per_replica + 1):
        from ray import serve

        try:  # Ctrl-C at any point, deploying included, shuts the application down cleanly
            with console.status("starting the Serve application (loading the model)"):
                url = start(config)
            names = [config.serve.model_name or folder_name(config.serve.base_model),
                     *config.serve.adapters]
            if config.serve.adapter_root:
                names.append(f"every adapter under {redact_uri(config.serve.adapter_root)}")
            console.print(f"serving {', '.join(names)} at {url}/v1 (OpenAI-compatible); "
                          f"latency endpoint {url}/v1/latency, metrics {url}/metrics. Ctrl-C stops.",
                          markup=False, highlight=False)
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("shutting down", markup=False, highlight=False)
        finally:
            serve.shutdown()
