"""The HTTP request schemas are as strict as OpenAI's: no type coercion, each refusal names its field."""

import pytest
from pydantic import ValidationError

from raytune_it.serving.schemas import ChatRequest, CompletionRequest, LatencyRequest, UnsupportedParameter

COMPLETION = {"model": "m", "prompt": "hi"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _refused_field(schema, body):
    try:
        schema.model_validate(schema.normalise(body) if hasattr(schema, "normalise") else body)
    except UnsupportedParameter as exc:
        return exc.param
    except ValidationError as exc:
        return ".".join(str(p) for p in exc.errors()[0]["loc"])
    return None


@pytest.mark.parametrize("schema,body,field", [
    (CompletionRequest, {**COMPLETION, "max_tokens": "5"}, "max_tokens"),
    (CompletionRequest, {**COMPLETION, "max_tokens": True}, "max_tokens"),
    (CompletionRequest, {**COMPLETION, "max_tokens": 5.0}, "max_tokens"),
    (CompletionRequest, {**COMPLETION, "max_completion_tokens": "5"}, "max_tokens"),
    (CompletionRequest, {**COMPLETION, "temperature": "0.5"}, "temperature"),
    (CompletionRequest, {**COMPLETION, "top_p": False}, "top_p"),
    (CompletionRequest, {**COMPLETION, "seed": "7"}, "seed"),
    (CompletionRequest, {**COMPLETION, "stream": "true"}, "stream"),
    (CompletionRequest, {**COMPLETION, "stream": 1}, "stream"),
    (CompletionRequest, {**COMPLETION, "prompt": 12}, "prompt"),
    (CompletionRequest, {**COMPLETION, "n": True}, "n"),
    (CompletionRequest, {**COMPLETION, "presence_penalty": False}, "presence_penalty"),
    (ChatRequest, {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages.0.content.str"),
    (LatencyRequest, {"model": "m", "prompt_tokens": "10"}, "prompt_tokens"),
    (LatencyRequest, {"model": "m", "prompt_tokens": 10, "ignore_eos": "no"}, "ignore_eos"),
])
def test_a_wrong_type_is_refused_naming_its_field(schema, body, field):
    assert _refused_field(schema, body) == field


def test_numbers_of_the_right_json_type_are_taken():
    body = CompletionRequest.model_validate(CompletionRequest.normalise(
        {**COMPLETION, "max_tokens": 5, "temperature": 1, "top_p": 0.5, "seed": 3, "n": 1, "presence_penalty": 0.0}))
    assert (body.max_tokens, body.temperature, body.top_p, body.seed) == (5, 1.0, 0.5, 3)
    assert isinstance(body.temperature, float)


def test_a_union_field_is_refused_by_its_own_name_with_what_it_accepts():
    """pydantic fails a union once per branch, each under a tag of its own: the client reads them together."""
    from raytune_it.errors import request_problem
    from raytune_it.service.job_request import JobRequest

    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate({"model": "m", "training_file": "file-x", "hyperparameters": {"n_epochs": 100}})
    assert request_problem(caught.value.errors()) == (
        "hyperparameters.n_epochs", "hyperparameters.n_epochs: Input should be 'auto' or less than or equal to 50")
    with pytest.raises(ValidationError) as caught:
        ChatRequest.model_validate({**CHAT, "stop": 5})
    assert request_problem(caught.value.errors()) == ("stop", "stop: Input should be a valid string or a valid list")
    with pytest.raises(ValidationError) as caught:
        ChatRequest.model_validate({**CHAT, "frobnicate": 1})
    assert request_problem(caught.value.errors()) == ("frobnicate", "frobnicate: not a parameter of this endpoint")
