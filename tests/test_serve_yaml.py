"""The Serve application YAMLs in serve/: valid against Ray Serve's schema, and `serve run` answers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import free_port, stop_process_group

ROOT = Path(__file__).parents[1]
SERVE_FILES = sorted((ROOT / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVE_FILES, ids=[p.name for p in SERVE_FILES])
def test_serve_yaml_matches_ray_serve_schema(path):
    from ray.serve.schema import ServeDeploySchema

    from raytune_it.config import load_config

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.http_options.host == "127.0.0.1", "bind to loopback unless configured otherwise"
    for app in schema.applications:
        assert app.import_path == "raytune_it.serving.app:app_builder"
        # the app's own config must validate too (paths are the user's to supply)
        load_config(app.args["config"], app.args.get("overrides", []), check_paths=False)


@pytest.mark.integration
def test_serve_run_of_the_tiny_yaml_comes_up_and_answers(tmp_path):
    port = free_port()
    spec = yaml.safe_load((ROOT / "serve" / "tiny.yaml").read_text())
    spec["http_options"]["port"] = port
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(spec))
    serve_bin = Path(sys.executable).with_name("serve")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen([str(serve_bin), "run", str(config_file)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, "serve run exited"
            assert time.monotonic() < deadline, "the application did not come up"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert response.json()["data"][0]["id"] == "tiny-llama"
        completion = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4})
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] >= 1
    finally:
        stop_process_group(process, signal.SIGINT, timeout=60)


@pytest.mark.integration
def test_raytune_it_serve_runs_until_ctrl_c_and_shuts_down_cleanly():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen([sys.executable, "-m", "raytune_it", "serve", "tiny-lora", f"serve.port={port}",
                                "serve.model_name=tiny"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, "raytune-it serve exited"
            assert time.monotonic() < deadline, "the endpoint did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "tiny"
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-2000:]
    assert "shutting down" in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
