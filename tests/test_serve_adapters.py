"""Adapters on demand: every adapter under serve.adapter_root (here a bucket on a real S3-compatible server)
is servable by name without redeploying, loaded on first request through Serve's model multiplexing and
kept in a per-replica LRU of serve.max_adapters_per_replica."""

import json
import uuid

import httpx
import pytest

from conftest import s3_uri
from helpers import free_port, train_tiny_adapter
from raytune_it.config import load_config

pytestmark = pytest.mark.integration
PROMPT = "### Instruction:\nWhat is the total dose for 40 kg at 5 mg per kg?\n\n### Response:\n"
APP = "adapters-test"


def upload(folder, root):
    """Copy a local adapter folder under the root in the bucket (as a user's `aws s3 cp` would)."""
    from raytune_it.storage import open_location

    destination = open_location(root) / folder.name
    for path in folder.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())


ENGINES = ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)]
# vLLM reserves its LoRA memory at start for the largest rank it will serve: the root holds rank-8 adapters
# now and a rank-16 one is trained later, so the deployment names its maximum.
ENGINE_OPTIONS = {"transformers": [], "vllm": ["serve.enforce_eager=true", "serve.kv_cache_gib=0.25",
                                               "serve.max_lora_rank=16"]}


@pytest.fixture(scope="module", params=ENGINES)
def served(request, tmp_path_factory, s3_endpoint):
    import ray
    from ray import serve

    from raytune_it.serving.run import start

    root = s3_uri(s3_endpoint, f"adapters-{uuid.uuid4().hex[:8]}")
    local = tmp_path_factory.mktemp("adapters")
    for index, name in enumerate(("alpha", "beta", "gamma")):
        upload(train_tiny_adapter(local / name, ["dosage", "bmi"], steps=2, seed=index), root)
    pickled = local / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (pickled / "adapter_model.bin").write_bytes(b"not unpickled")
    upload(pickled, root)
    upload(_adapter_for_another_base(local / "wrongbase"), root)
    port = free_port()
    config = load_config("tiny-lora", [
        f"serve.adapter_root={root}", "serve.max_adapters_per_replica=2", f"serve.port={port}",
        "serve.model_name=tiny-llama", "serve.max_model_len=512", f"serve.app_name={APP}",
        "serve.max_ongoing_requests=1", "serve.max_queued_requests=1",
        f"serve.engine={request.param}", *ENGINE_OPTIONS[request.param]])
    ray.init(num_cpus=4)
    url = start(config)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client, root
    serve.shutdown()
    ray.shutdown()


def _adapter_for_another_base(folder):
    """A real peft adapter whose LoRA shapes belong to a model twice as wide as the served one."""
    import torch
    from safetensors.torch import load_file, save_file

    adapter = train_tiny_adapter(folder, ["dosage"], steps=1)
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: torch.cat([t, t], dim=1) if "lora_A" in k else t for k, t in weights.items()},
              str(adapter / "adapter_model.safetensors"))
    return adapter


def loaded_adapters():
    from ray import serve

    return serve.get_deployment_handle("ModelServer", APP).loaded_adapters.remote().result()


def complete(client, model, **body):
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                "temperature": 0, **body})


def test_models_lists_what_is_under_the_root_and_bad_names_are_refused(served):
    client, _ = served
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [
        "tiny-llama", "alpha", "beta", "gamma", "pickled", "wrongbase"]
    for name, status, code, words in [
        ("nope", 404, "model_not_found", "does not exist"),
        ("../alpha", 404, "model_not_found", "does not exist"),
        ("pickled", 400, "invalid_adapter", "only safetensors"),
        ("wrongbase", 400, "invalid_adapter", "does not fit the base model"),
    ]:
        response = complete(client, name)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and words in error["message"] and error["param"] == "model"
        assert complete(client, "tiny-llama").status_code == 200, "the replica keeps serving"


def test_the_lru_evicts_past_its_size_and_reloads_the_same_adapter(served):
    client, _ = served
    first = {}
    for name in ("alpha", "beta"):
        response = complete(client, name)
        assert response.status_code == 200, response.text
        first[name] = response.json()["choices"][0]["text"]
    assert loaded_adapters() == ["alpha", "beta"]
    assert complete(client, "gamma").status_code == 200
    assert loaded_adapters() == ["beta", "gamma"], "the least recently used adapter (alpha) is evicted"
    again = complete(client, "alpha")
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == first["alpha"]
    assert loaded_adapters() == ["gamma", "alpha"]
    assert first["alpha"] != first["beta"] or first["alpha"] != complete(client, "tiny-llama").json()[
        "choices"][0]["text"], "adapters change the answer"


def test_an_adapter_trained_while_the_server_runs_is_served_by_name(served):
    from raytune_it.train.driver import train

    client, root = served
    run_name = f"fresh-{uuid.uuid4().hex[:6]}"
    assert complete(client, run_name).status_code == 404
    train(load_config("tiny-lora", [f"run.storage={root}", f"run.name={run_name}", "train.max_steps=3",
                                    "train.eval_every_steps=3", "scaling.num_workers=1"]))
    assert run_name in [m["id"] for m in client.get("/v1/models").json()["data"]]
    response = complete(client, run_name)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_past_the_queue_limit_clients_get_a_json_503_and_the_rest_are_served(served):
    import threading

    client, _ = served
    answers = []

    def one():
        with httpx.Client(base_url=client.base_url, timeout=300) as own:
            response = complete(own, "tiny-llama", max_tokens=200)
            answers.append((response.status_code, response.json()))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    refused = [body for status, body in answers if status == 503]
    assert all(b["error"]["code"] == "overloaded" and "retry" in b["error"]["message"] for b in refused)
    assert complete(client, "tiny-llama").status_code == 200
