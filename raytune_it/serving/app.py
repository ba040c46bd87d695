"""The Ray Serve application: an OpenAI-compatible HTTP ingress over the model deployment.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with ``stream``), POST /v1/latency (batch-1 timing runs), GET /metrics
(Prometheus), GET /health. Every error is an OpenAI-style JSON body: a 4xx for
what the client sent, a 503 when the deployment's queue is full, a 500 only for a
fault of the server (logged in the replica); nothing a client sends takes a replica
down.

The ingress parses, authenticates and shapes answers; it reaches the model only
through the ``ModelServer`` deployment's handle, with the requested adapter as
the multiplexed model id (``model_server``), and never touches an engine.

``build_app(config)`` is what ``raytune-it serve`` runs; ``app_builder(args)`` is
the import path for ``serve run`` / ``serve deploy`` (see ``serve/*.yaml``).
"""


import asyncio
import hmac
import json
import logging
import statistics
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytune_it.config.schema import JobConfig, ServeSection
from raytune_it.hardware import SERVER_TYPES
from raytune_it.serving.engines.base import EngineError, GenerationRequest, GenerationResult
from raytune_it.serving.metrics import CLIENT_CLOSED, INTERVAL_HEADER, cluster_metrics, report_interval_s
from raytune_it.serving.schemas import ChatRequest, CompletionRequest, LatencyRequest, UnsupportedParameter

api = FastAPI(title="raytune-it", description="OpenAI-compatible serving of tuned models")


def error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            500: "server_error", 503: "service_unavailable"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405) answer in the same JSON as every other error."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route {request.url.path}; routes: /v1/models, /v1/completions, /v1/chat/completions, "
                    "/v1/latency, /metrics, /health",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    response = error(exc.status_code, message, codes.get(exc.status_code, "http_error"))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logging.getLogger("ray.serve").exception("unhandled error on %s", request.url.path)
    return error(500, "internal server error; the error is in the replica's log", "internal_error")


def unauthorized() -> JSONResponse:
    return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")


def overloaded() -> EngineError:
    return EngineError("the server is at capacity (serve.max_queued_requests requests are waiting); retry later",
                       status=503, code="overloaded")


def _validation_error(exc: ValidationError) -> JSONResponse:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return error(400, f"{param}: {message}" if param else message, "invalid_request", param)


@serve.deployment
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, serve_config: ServeSection, models: DeploymentHandle) -> None:
        from raytune_it.serving.adapters import AdapterCatalog
        from raytune_it.serving.metrics import ServeMetrics
        from raytune_it.serving.model_server import base_model_name

        self.config = serve_config
        self.api_key = serve_config.resolved_api_key()
        self.model_server = models
        self.base_name = base_model_name(serve_config)
        self.catalog = AdapterCatalog(serve_config.adapters, serve_config.adapter_root)
        self.metrics = ServeMetrics([self.base_name, *serve_config.adapters])

    # --- request plumbing ----------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _body(self, request: Request, schema: Any) -> Any:
        """Parse and validate a JSON body, or return the JSONResponse that says what is wrong."""
        if not self._authorized(request):
            return unauthorized()
        limit = self.config.max_body_bytes
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
            body = schema.model_validate(schema.normalise(data) if hasattr(schema, "normalise") else data)
        except UnsupportedParameter as exc:
            return error(400, str(exc), "unsupported_parameter", exc.param)
        except ValidationError as exc:
            return _validation_error(exc)
        if getattr(body, "max_tokens", 0) > self.config.max_tokens_limit:
            return error(400, f"max_tokens: at most {self.config.max_tokens_limit}", "invalid_request",
                         "max_tokens")
        return body

    def _generation(self, body: Any, **prompt: Any) -> GenerationRequest:
        return GenerationRequest(model=body.model, max_tokens=body.max_tokens, temperature=body.temperature,
                                 top_p=body.top_p, stop=body.stop, seed=body.seed, **prompt)

    def _route(self, model: str) -> DeploymentHandle | EngineError:
        """The handle that reaches a replica able to serve ``model``: any replica for the base model, one
        holding (or loading) the adapter otherwise, through Serve's model multiplexing."""
        if model == self.base_name:
            return self.model_server
        if not self.catalog.knows(model):
            return EngineError(f"model {model!r} does not exist; available: "
                               f"{', '.join([self.base_name, *self.catalog.configured])}"
                               + (" and the adapters under serve.adapter_root" if self.catalog.root else ""),
                               status=404, code="model_not_found", param="model")
        return self.model_server.options(multiplexed_model_id=model)

    async def _generate(self, generation: GenerationRequest) -> GenerationResult | EngineError:
        handle = self._route(generation.model)
        if isinstance(handle, EngineError):
            return handle
        try:
            return await handle.generate.remote(generation)
        except BackPressureError:
            return overloaded()

    def _usage(self, result: Any) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
                "time_to_first_token_s": round(result.time_to_first_token_s, 6),
                "latency_s": round(result.latency_s, 6), "tokens_per_second": round(result.tokens_per_second, 3)}

    def _answer(self, route: str, arrived: float, model: str, response: Response) -> Response:
        """Every request is counted once, here or (streams) when its stream ends."""
        self.metrics.count(route, model, response.status_code, time.perf_counter() - arrived)
        return response

    def _refuse(self, route: str, arrived: float, model: str, exc: EngineError) -> Response:
        return self._answer(route, arrived, model, error(exc.status, str(exc), exc.code, exc.param))

    async def _respond(self, route: str, arrived: float, body: Any, chat: bool, **prompt: Any) -> Response:
        generation = self._generation(body, **prompt)
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            handle = self._route(body.model)
            if isinstance(handle, EngineError):
                return self._refuse(route, arrived, body.model, handle)
            chunks = handle.options(stream=True).stream.remote(generation)
            try:
                first = await chunks.__anext__()  # type: ignore[union-attr]  # a refused request is a 4xx, not a stream that carries an error
            except BackPressureError:
                first = overloaded()
            if isinstance(first, EngineError):
                return self._refuse(route, arrived, body.model, first)
            first_token = time.perf_counter() - arrived
            return StreamingResponse(self._sse(route, arrived, first_token, generation, first, chunks, rid, created,
                                               chat), media_type="text/event-stream")
        result = await self._generate(generation)
        if isinstance(result, EngineError):
            return self._refuse(route, arrived, body.model, result)
        # From arrival: everything before the engine's last token, less the decoding after its first.
        self.metrics.observe(body.model, result, time.perf_counter() - arrived - result.decode_seconds)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        return self._answer(route, arrived, body.model, JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": [choice], "usage": self._usage(result)}))

    async def _sse(self, route: str, arrived: float, first_token: float, generation: GenerationRequest, first: Any,
                   chunks: Any, rid: str, created: int, chat: bool):
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

        async def pieces():
            yield first
            async for piece in chunks:
                yield piece

        status = CLIENT_CLOSED  # unless the stream reaches its end
        try:
            if chat:
                yield chunk(None, None, role=True)
            async for piece in pieces():
                if isinstance(piece, EngineError):
                    status = piece.status
                    yield f"data: {json.dumps({'error': {'message': str(piece), 'code': piece.code}})}\n\n"
                    continue
                if piece.text:
                    yield chunk(piece.text, None)
                if piece.result is not None:
                    status = 200
                    self.metrics.observe(generation.model, piece.result, first_token)
                    yield chunk(None, piece.result.finish_reason, self._usage(piece.result))
            yield "data: [DONE]\n\n"
        finally:
            chunks.cancel()  # a client that left stops its generation on the model replica
            self.metrics.count(route, generation.model, status, time.perf_counter() - arrived)

    # --- routes ------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        """The app's metrics summed over every replica on every node (Prometheus should scrape Ray's own
        metrics endpoints; this is the same numbers at a glance). They lag by up to Ray's metrics report
        interval, which the page's first line and a header give."""
        return Response(await cluster_metrics(), media_type="text/plain; version=0.0.4",
                        headers={INTERVAL_HEADER: f"{report_interval_s():g}"})

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        arrived = time.perf_counter()
        if not self._authorized(request):
            return self._answer("/v1/models", arrived, "-", unauthorized())
        names = [self.base_name, *(await asyncio.to_thread(self.catalog.names))]
        return self._answer("/v1/models", arrived, "-", JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "raytune-it",
             "root": names[0], "parent": None if name == names[0] else names[0]} for name in names]}))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body = await self._body(request, CompletionRequest)
        if isinstance(body, Response):
            return self._answer("/v1/completions", arrived, "-", body)
        return await self._respond("/v1/completions", arrived, body, chat=False, prompt=body.prompt)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body = await self._body(request, ChatRequest)
        if isinstance(body, Response):
            return self._answer("/v1/chat/completions", arrived, "-", body)
        return await self._respond("/v1/chat/completions", arrived, body, chat=True,
                                   messages=[m.as_dict() for m in body.messages])

    @api.post("/v1/latency")
    async def latency(self, request: Request) -> Response:
        """Batch-1 timing: ``repeats`` generations one after another, each run's numbers and the medians."""
        route, arrived = "/v1/latency", time.perf_counter()
        body = await self._body(request, LatencyRequest)
        if isinstance(body, Response):
            return self._answer(route, arrived, "-", body)
        if (body.prompt is None) == (body.prompt_tokens is None):
            return self._answer(route, arrived, body.model, error(
                400, "give exactly one of prompt or prompt_tokens", "invalid_request", "prompt"))
        runs = []
        for _ in range(body.repeats):
            result = await self._generate(GenerationRequest(
                model=body.model, prompt=body.prompt, synthetic_tokens=body.prompt_tokens,
                max_tokens=body.max_tokens, temperature=0.0, ignore_eos=body.ignore_eos))
            if isinstance(result, EngineError):
                return self._refuse(route, arrived, body.model, result)
            self.metrics.observe(body.model, result, result.time_to_first_token_s)
            runs.append({"time_to_first_token_s": result.time_to_first_token_s, "latency_s": result.latency_s,
                         "time_per_output_token_s": result.time_per_output_token_s,
                         "tokens_per_second": result.tokens_per_second, "prompt_tokens": result.prompt_tokens,
                         "completion_tokens": result.completion_tokens})
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        handle = self._route(body.model)  # known: the generations above were routed
        assert not isinstance(handle, EngineError)
        info = await handle.info.remote()
        return self._answer(route, arrived, body.model, JSONResponse({
            "model": body.model, "batch_size": 1, "repeats": body.repeats, **info, "median": median, "runs": runs}))


def max_ongoing_requests(config: JobConfig) -> int:
    """vLLM batches what a replica holds, so it holds many; the transformers engine runs one at a time."""
    serve_config = config.serve
    if serve_config.max_ongoing_requests is not None:
        return serve_config.max_ongoing_requests
    batching = serve_config.engine == "vllm" or (serve_config.engine == "auto" and serve_config.use_gpu)
    return 64 if batching else 4


def deployment_options(config: JobConfig) -> dict[str, Any]:
    """The model deployment's options: replicas, their resources, and the queue past which clients get 503."""
    serve_config = config.serve
    actor: dict[str, Any] = {"num_cpus": serve_config.cpus_per_replica}
    if serve_config.use_gpu:
        actor["num_gpus"] = 1
    if serve_config.server_type != "any":
        actor["resources"] = {SERVER_TYPES[serve_config.server_type].resource: 1}
    options: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": max_ongoing_requests(config),
                               "max_queued_requests": serve_config.max_queued_requests}
    if serve_config.autoscaling is not None:
        options["autoscaling_config"] = serve_config.autoscaling.model_dump()
    else:
        options["num_replicas"] = serve_config.num_replicas
    return options


def ingress_options(config: JobConfig) -> dict[str, Any]:
    """The HTTP ingress only parses and awaits: no CPU reserved, as many replicas as the model deployment
    (so no single one is in every request's path), each holding every request the model deployment may be
    serving or queueing (that deployment's own queue limit answers 503)."""
    serve_config = config.serve
    replicas = serve_config.autoscaling.max_replicas if serve_config.autoscaling else serve_config.num_replicas
    queued = max(serve_config.max_queued_requests, 0)
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0},
                               "max_ongoing_requests": max_ongoing_requests(config) * replicas + queued + 16}
    if serve_config.autoscaling is not None:
        options["autoscaling_config"] = {**serve_config.autoscaling.model_dump(),
                                         "min_replicas": max(serve_config.autoscaling.min_replicas, 1)}
    else:
        options["num_replicas"] = serve_config.num_replicas
    return options


def check_paths(config: JobConfig) -> None:
    """What the deployment will load exists: the base model, each configured adapter (safetensors), the
    adapter root. On the driver, before Ray starts; storage URIs are listed, never downloaded."""
    from raytune_it.config.paths import check_model_path
    from raytune_it.errors import ConfigError
    from raytune_it.serving.adapters import check_adapter_dir, check_adapter_root

    check_model_path(config.serve.base_model, "serve.base_model")
    try:
        for name, path in config.serve.adapters.items():
            check_adapter_dir(name, path)
        if config.serve.adapter_root:
            check_adapter_root(config.serve.adapter_root)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_app(config: JobConfig) -> Any:
    from raytune_it.serving.model_server import ModelServer

    check_paths(config)
    # The key is resolved here, where the user gave it (config or this process's environment), and handed to
    # the ingress: replicas on an attached cluster do not see the driver's environment.
    serve_config = config.serve.model_copy(update={"api_key": config.serve.resolved_api_key()})
    # (serve.deployment made both classes Deployments, which mypy cannot see)
    models = ModelServer.options(**deployment_options(config)).bind(serve_config)  # type: ignore[attr-defined]
    return OpenAIServer.options(**ingress_options(config)).bind(serve_config, models)  # type: ignore[attr-defined]


def app_builder(args: dict) -> Any:
    """For ``serve run`` / ``serve deploy``: args ``config`` (preset or YAML) and ``overrides`` (a list)."""
    from raytune_it.config import load_config

    config = load_config(args.get("config"), list(args.get("overrides", [])))
    return build_app(config)
