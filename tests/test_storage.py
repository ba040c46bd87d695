"""Run storage against a real S3-compatible server (moto on 127.0.0.1): URIs, publishing, fetching, bad storage."""

import json
import os

import pytest

from conftest import BUCKET, s3_uri
from raytune_it.config import load_config
from raytune_it.errors import ConfigError, UserError
from raytune_it.storage import MANIFEST, fetch_dir, is_published, local, open_location, publish_dir


def test_uris_are_checked_without_the_network_and_never_carry_credentials():
    with pytest.raises(ConfigError, match=r"run.storage: got 'ftp://host/runs'; value error, scheme 'ftp' is not "
                                          r"supported; allowed: a local path, or s3://"):
        load_config("tiny-lora", ["run.storage=ftp://host/runs"])
    with pytest.raises(ConfigError) as refused:
        load_config("tiny-lora", ["run.storage=s3://AKIAEXAMPLE:hunter2@bucket/runs"])
    assert "credentials in the URI" in str(refused.value) and "hunter2" not in str(refused.value)
    with pytest.raises(ConfigError, match="serve.adapters"):
        load_config("tiny-lora", ['serve.adapters={"med": "s3://bucket/a?secret_key=x"}'])
    with pytest.raises(ConfigError, match="names no bucket"):
        load_config("tiny-lora", ["run.storage=s3:///runs"])


def test_a_uri_is_storage_not_a_local_folder(s3_endpoint):
    base = open_location(s3_uri(s3_endpoint, "prefix"))
    assert not base.is_local and base.path == f"{BUCKET}/prefix"
    child = base / "run" / "export"
    # The endpoint in the query string stays with every folder below, so workers reopen the same storage.
    assert child.uri == f"s3://{BUCKET}/prefix/run/export?endpoint_override={s3_endpoint}&scheme=http"
    assert child.parent.uri == (base / "run").uri and child.name == "export"
    assert open_location("file:///tmp/x").is_local and open_location("./runs").is_local


def _folder(tmp_path, name="src", nested=True):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    if nested:
        (folder / "sub").mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    if nested:
        (folder / "sub" / "weights.bin").write_bytes(b"pickle")
    return folder


@pytest.mark.parametrize("where", ["local", "s3"])
def test_published_folder_is_whole_fetched_checked_and_without_pickles(tmp_path, s3_storage, where):
    dest = (local(tmp_path / "store") if where == "local" else open_location(s3_storage)) / "export"
    publish_dir(_folder(tmp_path), dest, extra={"best.json": "{}"})
    assert is_published(dest)
    manifest = json.loads((dest / MANIFEST).read_text())["files"]
    assert manifest == {"adapter_config.json": 8, "adapter_model.safetensors": 1000, "sub/weights.bin": 6,
                        "best.json": 2}
    fetched = fetch_dir(dest, "serve.adapters.med")
    if where == "local":
        assert str(fetched) == dest.path  # a local folder is used where it is
        return
    assert sorted(p.name for p in fetched.iterdir()) == [MANIFEST, "adapter_config.json",
                                                         "adapter_model.safetensors", "best.json"]
    assert fetch_dir(dest, "k") == fetched, "an unchanged folder is fetched once"
    # Re-published with other content: a new copy, and the old manifest was retracted before any write.
    (tmp_path / "src" / "adapter_config.json").write_text('{"r": 16}')
    publish_dir(tmp_path / "src", dest)
    again = fetch_dir(dest, "k")
    assert again != fetched and json.loads((again / "adapter_config.json").read_text()) == {"r": 16}


def test_a_flat_folder_publishes_to_a_new_local_place_and_replaces_the_old(tmp_path):
    dest = local(tmp_path / "runs" / "run") / "export"
    publish_dir(_folder(tmp_path, nested=False), dest)
    publish_dir(_folder(tmp_path, "other", nested=False), dest)
    assert sorted(p.name for p in (tmp_path / "runs" / "run").iterdir()) == ["export"], "no staging left behind"
    assert sorted(dest.files()) == [MANIFEST, "adapter_config.json", "adapter_model.safetensors"]


def test_fetch_refuses_a_folder_that_does_not_match_its_manifest(tmp_path, s3_storage):
    dest = open_location(s3_storage) / "export"
    publish_dir(_folder(tmp_path), dest)
    (dest / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # changed under a published manifest
    with pytest.raises(UserError, match=r"serve.adapters.med: adapter_model.safetensors .* is 10 bytes, its "
                                        r"manifest says 1000"):
        fetch_dir(dest, "serve.adapters.med")
    with pytest.raises(UserError, match="is empty or does not exist"):
        fetch_dir(open_location(s3_storage) / "nothing", "serve.adapters.med")


def test_bad_storage_fails_before_ray_starts_naming_the_key_and_the_cause(s3_endpoint, tmp_path):
    import ray

    from raytune_it.train.driver import train

    def attempt(storage):
        with pytest.raises(ConfigError) as failure:
            train(load_config("tiny-lora", [f"run.storage={storage}"]))
        return str(failure.value)

    missing = attempt(f"s3://no-such-bucket/runs?endpoint_override={s3_endpoint}&scheme=http")
    assert missing.startswith("run.storage: bucket 'no-such-bucket' does not exist")
    free = __import__("helpers").free_port()
    unreachable = attempt(f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{free}&scheme=http")
    assert unreachable.startswith("run.storage: the storage endpoint is unreachable")
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert attempt(str(blocked / "runs")).startswith("run.storage: cannot create")
    assert not ray.is_initialized(), "no Ray cluster (so no worker) was started for bad storage"


def test_data_and_model_uris_are_checked_on_the_driver_and_fetched_once(s3_storage, tiny_model_dir):
    from raytune_it.data.pipeline import resolve_data_paths
    from raytune_it.models.loading import resolve_model_path

    records = open_location(s3_storage) / "data" / "alpaca.jsonl"
    records.write_text('{"instruction": "Say hi.", "input": "", "output": "hi"}\n')
    config = load_config("tiny-lora", [f"data.path={records.uri}"])
    [local_copy] = resolve_data_paths(config.data)
    assert local_copy.name == "alpaca.jsonl" and local_copy.read_text().startswith('{"instruction"')
    assert resolve_data_paths(config.data) == [local_copy]
    with pytest.raises(ConfigError, match=r"data.path: s3://.*/nothing.jsonl.* does not exist in storage"):
        load_config("tiny-lora", [f"data.path={(open_location(s3_storage) / 'nothing.jsonl').uri}"])

    model = open_location(s3_storage) / "models" / "tiny"
    publish_dir(tiny_model_dir, model)
    load_config("tiny-lora", [f"model.name_or_path={model.uri}"])  # listed, not downloaded
    meta = resolve_model_path(model.uri, weights=False)
    assert not any(name.endswith(".safetensors") for name in os.listdir(meta))
    full = resolve_model_path(model.uri)
    assert any(name.endswith(".safetensors") for name in os.listdir(full))
    with pytest.raises(ConfigError, match="is not a Hugging Face model folder"):
        load_config("tiny-lora", [f"model.name_or_path={(open_location(s3_storage) / 'data').uri}"])


def test_storage_without_write_permission_is_refused_before_launch(monkeypatch):
    """moto with IAM enforced: a user that may only read the bucket gets a clear error, before Ray starts."""
    import subprocess
    import sys
    import time

    import boto3

    from helpers import free_port

    port = free_port()
    # The first 4 requests go unauthenticated (they set up the bucket, the user and its key); IAM after that.
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        options = dict(endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3", **options).create_bucket(Bucket="read-only")
                break
            except Exception:
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.3)
        iam = boto3.client("iam", **options)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        from raytune_it.train.driver import train

        with pytest.raises(ConfigError, match=r"^run.storage: no write permission; give this node's credentials "
                                              r"write access"):
            train(load_config("tiny-lora", [f"run.storage=s3://read-only/runs?endpoint_override=127.0.0.1:{port}"
                                            "&scheme=http"]))
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_write_that_fails_midway_leaves_neither_the_target_nor_a_staging_file(tmp_path, s3_storage):
    for target in (local(tmp_path / "out.jsonl"), open_location(s3_storage) / "out.jsonl"):
        with pytest.raises(RuntimeError, match="midway"):
            with target.writer() as handle:
                handle.write(b"half a record")
                raise RuntimeError("midway")
        assert not target.exists() and not target.parent.listdir()
        target.write_bytes(b"whole\n")
        assert target.read_bytes() == b"whole\n" and target.parent.listdir() == ["out.jsonl"]
