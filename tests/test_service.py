"""The fine-tuning service's parts without a cluster: who a key belongs to, what a job request becomes,
an upload's limits, paging, names. The whole service runs in test_fine_tuning_api.py."""

import asyncio
import hashlib
import json

import pytest

from raytune_it.config import load_config
from raytune_it.errors import ConfigError
from raytune_it.service.errors import ApiError
from raytune_it.service.files import receive_upload
from raytune_it.service.job_request import ALLOWED_OVERRIDES, JobRequest, build_job_config
from raytune_it.service.jobs import page
from raytune_it.service.names import FineTunedName, parse_fine_tuned
from raytune_it.service.organizations import DEFAULT_ORGANIZATION, load_organizations


def test_keys_map_to_their_organization_and_only_digests_are_kept(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"acme: ['sha256:{hashlib.sha256(b'acme-key').hexdigest()}', second-acme-key]\n"
                    "globex: globex-key\n")
    organizations = load_organizations("single-key", str(keys))
    assert organizations.of_bearer("Bearer acme-key") == "acme"
    assert organizations.of_bearer("Bearer second-acme-key") == "acme"
    assert organizations.of_bearer("bearer globex-key") == "globex"
    assert organizations.of_bearer("Bearer single-key") == DEFAULT_ORGANIZATION
    for header in ("Bearer wrong", "Basic acme-key", "acme-key", ""):
        assert organizations.of_bearer(header) is None
    assert "acme-key" not in repr(organizations) and "globex-key" not in repr(organizations)
    assert load_organizations(None, None).of_bearer("") == DEFAULT_ORGANIZATION  # no key set: open


@pytest.mark.parametrize("text, words", [
    ("acme: 'sha256:abc'\n", "64 hex digits"),
    ("'bad name!': key\n", "letters, digits"),
    ("acme: same\nglobex: same\n", "both 'acme' and 'globex'"),
    ("- a list\n", "must map organization names"),
    ("acme: ''\n", "non-empty"),
])
def test_a_bad_keys_file_is_named_before_anything_starts(tmp_path, text, words):
    keys = tmp_path / "keys.yaml"
    keys.write_text(text)
    with pytest.raises(ConfigError, match="serve.api_keys_file") as caught:
        load_organizations(None, str(keys))
    assert words in str(caught.value)


def job_config(request: dict, template: str = "tiny-lora"):
    config = load_config(template, ["run.storage=/tmp/unused"])
    return build_job_config(config, JobRequest.model_validate({"model": "tiny-llama", "training_file": "file-x",
                                                               **request}),
                            base_model=config.serve.base_model, data={"path": "/data/train.jsonl", "format": "messages",
                                                                      "file_type": "jsonl", "eval_path": None},
                            run_storage="/srv/fine_tuning/runs", job_id="ftjob-" + "a" * 24, records=100)


def test_a_request_becomes_the_apps_config_with_openais_hyperparameters():
    template = load_config("tiny-lora")
    config, resolved = job_config({"seed": 7, "method": {"type": "supervised", "supervised": {"hyperparameters": {
        "batch_size": 16, "learning_rate_multiplier": 2, "n_epochs": "auto"}}},
        "raytune_it": {"lora.rank": 4, "train.eval_every_steps": 5}})
    assert (config.train.epochs, config.train.max_steps) == (3, None)  # auto: the survey's 3 epochs, no cap
    assert config.train.learning_rate == pytest.approx(template.train.learning_rate * 2)
    assert config.train.micro_batch_size * config.scaling.num_workers == 16 and config.train.seed == 7
    assert (config.lora.rank, config.train.eval_every_steps) == (4, 5)
    assert (config.run.storage, config.run.name) == ("/srv/fine_tuning/runs", "ftjob-" + "a" * 24)
    assert (config.data.path, config.data.format, config.model.name_or_path) == (
        "/data/train.jsonl", "messages", template.serve.base_model)
    assert resolved == {"n_epochs": 3, "batch_size": 16, "learning_rate_multiplier": 2.0}


def test_only_allowlisted_settings_may_be_changed_and_their_values_are_checked():
    assert not any(key.startswith(("run.", "serve.", "tracking.", "model.")) or key == "data.path"
                   for key in ALLOWED_OVERRIDES)
    with pytest.raises(ApiError) as caught:
        job_config({"raytune_it": {"model.trust_remote_code": True}})
    assert (caught.value.status, caught.value.param) == (400, "raytune_it.model.trust_remote_code")
    with pytest.raises(ApiError) as caught:
        job_config({"raytune_it": {"lora.rank": 0}})
    assert caught.value.status == 400 and "lora.rank" in str(caught.value)


def test_auto_batch_is_the_planners_for_the_server_type():
    from raytune_it.config.loading import with_overrides
    from raytune_it.plan.planner import plan, workload_from_config

    config, resolved = job_config({"raytune_it": {"scaling.server_type": "rtx3090-24g"}})
    asked = with_overrides(load_config("tiny-lora"), {"scaling.server_type": "rtx3090-24g"})
    chosen = plan(workload_from_config(asked, records=100))  # for the app's own global batch
    assert config.train.micro_batch_size == chosen.per_device_batch_size
    assert resolved["batch_size"] == (chosen.per_device_batch_size * chosen.gradient_accumulation_steps
                                      * config.scaling.num_workers)


def multipart(fields: dict, filename: str, data: bytes, boundary: str = "xyzzy") -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def test_an_upload_is_parsed_as_it_streams_and_stopped_at_its_limit(tmp_path):
    body = multipart({"purpose": "fine-tune"}, "train.jsonl", b'{"a": 1}\n' * 1000)
    sent = []

    async def chunks():
        for start in range(0, len(body), 1024):
            sent.append(start)
            yield body[start:start + 1024]

    upload = asyncio.run(receive_upload(chunks(), "multipart/form-data; boundary=xyzzy", 10**6, tmp_path / "u"))
    assert (upload.fields, upload.filename, upload.size) == ({"purpose": "fine-tune"}, "train.jsonl", 9000)
    assert (tmp_path / "u").read_bytes() == b'{"a": 1}\n' * 1000
    sent.clear()
    with pytest.raises(ApiError) as caught:
        asyncio.run(receive_upload(chunks(), "multipart/form-data; boundary=xyzzy", 2000, tmp_path / "v"))
    assert caught.value.status == 413 and len(sent) < 5  # stopped at the limit, not after the whole body
    with pytest.raises(ApiError) as caught:
        asyncio.run(receive_upload(chunks(), "application/json", 10**6, tmp_path / "w"))
    assert caught.value.status == 400


def test_paging_and_names():
    items = [{"id": f"x{i}"} for i in range(5)]
    first = page(items, None, 2)
    assert [i["id"] for i in first["data"]] == ["x0", "x1"] and first["has_more"]
    rest = page(items, "x1", 10)
    assert [i["id"] for i in rest["data"]] == ["x2", "x3", "x4"] and not rest["has_more"]
    name = FineTunedName("tiny-llama", "acme", "", "ftjob-" + "b" * 24)
    assert str(name) == "ft:tiny-llama:acme::ftjob-" + "b" * 24 and parse_fine_tuned(str(name)) == name
    for bad in ("ft:tiny-llama:acme:x:ftjob-123", "tiny-llama", "ft:a:b:c:d:ftjob-" + "b" * 24):
        assert parse_fine_tuned(bad) is None


def test_an_eval_file_of_its_own_is_the_eval_split(tmp_path):
    from raytune_it.config.schema import DataSection
    from raytune_it.data.pipeline import iter_split_records
    from raytune_it.data.records import ReadReport

    def records(path, count, word):
        path.write_text("".join(json.dumps({"instruction": f"{word} {i}", "input": "", "output": "ok"}) + "\n"
                                for i in range(count)))
        return str(path)

    data = DataSection(path=records(tmp_path / "t.jsonl", 20, "train"),
                       eval_path=records(tmp_path / "e.jsonl", 3, "eval"))
    train = list(iter_split_records(data, "train", 0, ReadReport()))
    held_out = list(iter_split_records(data, "eval", 0, ReadReport()))
    assert len(train) == 20 and all(r["instruction"].startswith("train") for r in train)
    assert len(held_out) == 3 and all(r["instruction"].startswith("eval") for r in held_out)


def test_a_config_is_read_from_a_storage_uri(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(load_config("tiny-lora", ["lora.rank=4"]).to_yaml())
    assert load_config(f"file://{saved}").lora.rank == 4


def test_a_restarted_service_finds_every_file_and_job_where_the_last_one_left_them(tmp_path):
    """All the service's state is in run.storage: a new instance (an app restarted, another replica) has it."""
    from raytune_it.service.jobs import FineTuningService

    template = load_config("tiny-lora", ["serve.fine_tuning=true", f"run.storage={tmp_path / 'runs'}"])
    first = FineTuningService(template, "tiny-llama")
    first.max_running = 0  # nothing is started: this test has no cluster
    record = json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})

    async def chunks():
        yield multipart({"purpose": "fine-tune"}, "train.jsonl", (record + "\n").encode() * 3)

    upload = asyncio.run(first.upload("default", chunks(), "multipart/form-data; boundary=xyzzy", 10**6))
    job = first.create_job("default", {"model": "tiny-llama", "training_file": upload["id"], "suffix": "x"})
    assert job["status"] == "queued"

    again = FineTuningService(template, "tiny-llama")
    again.max_running = 0
    assert again.get_file("default", upload["id"]) == upload
    assert b"".join(again.file_content("default", upload["id"])) == (record + "\n").encode() * 3
    assert again.get_job("default", job["id"]) == job
    events = [e["message"] for e in again.events("default", job["id"], None, 100)["data"]]
    assert any("Created fine-tuning job" in m for m in events) and any("queued" in m for m in events)
    with pytest.raises(ApiError) as caught:
        again.get_job("acme", job["id"])
    assert caught.value.status == 404


def test_a_job_created_while_ray_is_out_of_reach_waits_queued_and_the_request_succeeds(tmp_path):
    """A head whose job agent is not up yet, or a dashboard restarting: the client's request is not at fault."""
    from helpers import free_port
    from raytune_it.service.jobs import FineTuningService

    template = load_config("tiny-lora", ["serve.fine_tuning=true", f"run.storage={tmp_path / 'runs'}"])
    service = FineTuningService(template, "tiny-llama", ray_address=f"http://127.0.0.1:{free_port()}")  # no one
    record = json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})

    async def chunks():
        yield multipart({"purpose": "fine-tune"}, "train.jsonl", (record + "\n").encode() * 3)

    upload = asyncio.run(service.upload("default", chunks(), "multipart/form-data; boundary=xyzzy", 10**6))
    job = service.create_job("default", {"model": "tiny-llama", "training_file": upload["id"]})
    assert job["status"] == "queued" and service.get_job("default", job["id"])["status"] == "queued"
    with pytest.raises(ConnectionError, match="Failed to connect to Ray"):
        service.reconcile()  # the ingress's loop sees the failure, logs it once and tries again
