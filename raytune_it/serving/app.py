"""The Ray Serve application: OpenAI-compatible routes over an engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with ``stream``), POST /v1/latency (batch-1 timing runs), GET /metrics
(Prometheus), GET /health. Every error is an OpenAI-style JSON body with a 4xx
status; nothing a client sends takes the replica down.

``build_app(config)`` is what ``raytune-it serve`` runs; ``app_builder(args)`` is
the import path for ``serve run`` / ``serve deploy`` (see ``serve/*.yaml``).
"""


import hmac
import json
import os
import statistics
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from raytune_it.config.schema import JobConfig
from raytune_it.hardware import SERVER_TYPES
from raytune_it.serving.engines.base import EngineError, GenerationRequest
from raytune_it.serving.schemas import ChatRequest, CompletionRequest, LatencyRequest

api = FastAPI(title="raytune-it", description="OpenAI-compatible serving of tuned models")


def error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            503: "service_unavailable"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _validation_error(exc: ValidationError) -> JSONResponse:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return error(400, f"{param}: {first['msg']}" if param else first["msg"], "invalid_request", param)


@serve.deployment
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, serve_config: dict) -> None:
        from raytune_it.serving.engines import create_engine
        from raytune_it.serving.metrics import ServeMetrics

        self.config = serve_config
        self.api_key = serve_config.get("api_key") or os.environ.get("RAYTUNE_IT_API_KEY") or None
        self.engine = create_engine(serve_config)
        self.metrics = ServeMetrics(self.engine.model_names())

    # --- request plumbing ----------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _body(self, request: Request, schema: type) -> Any:
        """Parse and validate a JSON body, or return the JSONResponse that says what is wrong."""
        if not self._authorized(request):
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        limit = self.config["max_body_bytes"]
        if int(request.headers.get("content-length") or 0) > limit:
            return error(413, f"request body over {limit} bytes", "request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            return error(413, f"request body over {limit} bytes", "request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"the body is not valid JSON: {exc}", "invalid_json")
        if not isinstance(data, dict):
            return error(400, "the body must be a JSON object", "invalid_request")
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            return _validation_error(exc)
        if getattr(body, "max_tokens", 0) > self.config["max_tokens_limit"]:
            return error(400, f"max_tokens: at most {self.config['max_tokens_limit']}", "invalid_request",
                         "max_tokens")
        return body

    def _generation(self, body: Any, prompt: str) -> GenerationRequest:
        return GenerationRequest(model=body.model, prompt=prompt, max_tokens=body.max_tokens,
                                 temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed)

    def _usage(self, result: Any) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
                "time_to_first_token_s": round(result.time_to_first_token_s, 6),
                "latency_s": round(result.latency_s, 6), "tokens_per_second": round(result.tokens_per_second, 3)}

    async def _respond(self, body: Any, prompt: str, chat: bool) -> Response:
        generation = self._generation(body, prompt)
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            self.engine.check(generation)  # refuse a bad request before a stream starts
            if body.stream:
                return StreamingResponse(self._sse(generation, rid, created, chat), media_type="text/event-stream")
            result = await self.engine.generate(generation)
        except EngineError as exc:
            self.metrics.count(body.model, exc.status)
            return error(exc.status, str(exc), exc.code, exc.param)
        self.metrics.observe(body.model, result)
        self.metrics.count(body.model, 200)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": body.model, "choices": [choice],
                             "usage": self._usage(result)})

    async def _sse(self, generation: GenerationRequest, rid: str, created: int, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, usage: dict | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": rid, "object": kind, "created": created, "model": generation.model, "choices": [choice]}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        if chat:
            yield chunk(None, None, role=True)
        try:
            async for piece in self.engine.stream(generation):
                if piece.result is not None:
                    self.metrics.observe(generation.model, piece.result)
                    self.metrics.count(generation.model, 200)
                    yield chunk(None, piece.result.finish_reason, self._usage(piece.result))
                elif piece.text:
                    yield chunk(piece.text, None)
        except EngineError as exc:
            self.metrics.count(generation.model, exc.status)
            yield f"data: {json.dumps({'error': {'message': str(exc), 'code': exc.code}})}\n\n"
        yield "data: [DONE]\n\n"

    # --- routes ------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if not self._authorized(request):
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        names = self.engine.model_names()
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "raytune-it",
             "root": names[0], "parent": None if name == names[0] else names[0]} for name in names]})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        body = await self._body(request, CompletionRequest)
        if isinstance(body, Response):
            self.metrics.count("-", body.status_code)
            return body
        return await self._respond(body, body.prompt, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        body = await self._body(request, ChatRequest)
        if isinstance(body, Response):
            self.metrics.count("-", body.status_code)
            return body
        prompt = self.engine.render_chat([m.model_dump() for m in body.messages])
        return await self._respond(body, prompt, chat=True)

    @api.post("/v1/latency")
    async def latency(self, request: Request) -> Response:
        """Batch-1 timing: ``repeats`` generations one after another, each run's numbers and the medians."""
        body = await self._body(request, LatencyRequest)
        if isinstance(body, Response):
            return body
        if (body.prompt is None) == (body.prompt_tokens is None):
            return error(400, "give exactly one of prompt or prompt_tokens", "invalid_request", "prompt")
        prompt: str | list[int] = body.prompt if body.prompt is not None else self._synthetic_prompt(body.prompt_tokens)
        runs = []
        for _ in range(body.repeats):
            generation = GenerationRequest(model=body.model, prompt=prompt, max_tokens=body.max_tokens,
                                           temperature=0.0, ignore_eos=body.ignore_eos)
            try:
                result = await self.engine.generate(generation)
            except EngineError as exc:
                return error(exc.status, str(exc), exc.code, exc.param)
            self.metrics.observe(body.model, result)
            runs.append({"time_to_first_token_s": result.time_to_first_token_s, "latency_s": result.latency_s,
                         "time_per_output_token_s": result.time_per_output_token_s,
                         "tokens_per_second": result.tokens_per_second, "prompt_tokens": result.prompt_tokens,
                         "completion_tokens": result.completion_tokens})
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        return JSONResponse({"model": body.model, "batch_size": 1, "repeats": body.repeats,
                             **self.engine.info(), "median": median, "runs": runs})

    def _synthetic_prompt(self, length: int) -> list[int]:
        tokenizer = self.engine.tokenizer
        filler = tokenizer(" the", add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return (bos + filler * length)[:length]


def deployment_options(config: JobConfig) -> dict[str, Any]:
    serve_config = config.serve
    actor: dict[str, Any] = {"num_cpus": serve_config.cpus_per_replica}
    if serve_config.use_gpu:
        actor["num_gpus"] = 1
    if serve_config.server_type != "any":
        actor["resources"] = {SERVER_TYPES[serve_config.server_type].resource: 1}
    options: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": serve_config.max_ongoing_requests,
                               "max_queued_requests": serve_config.max_queued_requests}
    if serve_config.autoscaling is not None:
        options["autoscaling_config"] = serve_config.autoscaling.model_dump()
    else:
        options["num_replicas"] = serve_config.num_replicas
    return options


def build_app(config: JobConfig) -> Any:
    from raytune_it.config.paths import check_model_path
    from raytune_it.serving.engines.transformers_engine import check_adapter_dir

    # On the driver, before any replica starts; storage URIs are listed here and fetched by each replica.
    check_model_path(config.serve.base_model, "serve.base_model")
    for name, path in config.serve.adapters.items():
        check_adapter_dir(name, path)
    return OpenAIServer.options(**deployment_options(config)).bind(config.serve.model_dump())


def app_builder(args: dict) -> Any:
    """For ``serve run`` / ``serve deploy``: args ``config`` (preset or YAML) and ``overrides`` (a list)."""
    from raytune_it.config import load_config

    config = load_config(args.get("config"), list(args.get("overrides", [])))
    return build_app(config)
