"""The Ray Serve application: an OpenAI-compatible HTTP ingress over the model deployment.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with ``stream``), POST /v1/latency (batch-1 timing runs), GET /metrics
(Prometheus), GET /health; with ``serve.fine_tuning``, OpenAI's fine-tuning API
too (/v1/files, /v1/fine_tuning/jobs: ``raytune_it.service``). Every error is an OpenAI-style JSON body: a 4xx for
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
import json
import logging
import statistics
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytune_it.config.schema import JobConfig, ServeSection
from raytune_it.data.records import MAX_NESTING, nests_too_deep
from raytune_it.errors import request_problem
from raytune_it.hardware import SERVER_TYPES
from raytune_it.service.errors import ApiError
from raytune_it.service.organizations import Organizations, load_organizations
from raytune_it.serving.engines.base import EngineError, GenerationRequest, GenerationResult
from raytune_it.serving.metrics import CLIENT_CLOSED, INTERVAL_HEADER, cluster_metrics, report_interval_s
from raytune_it.serving.schemas import ChatRequest, CompletionRequest, LatencyRequest, UnsupportedParameter

#: How often each ingress replica brings the fine-tuning jobs up to date with Ray, between requests.
RECONCILE_EVERY_S = 5.0

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
                    "/v1/latency, /metrics, /health, and with serve.fine_tuning /v1/files, /v1/fine_tuning/jobs",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    response = error(exc.status_code, message, codes.get(exc.status_code, "http_error"))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


@api.exception_handler(RequestValidationError)
async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A query or path parameter of the wrong type (``?limit=abc``) is a 400 in OpenAI's shape, not FastAPI's
    422 ``{"detail": [...]}``."""
    problem = exc.errors()[0]
    location = [str(part) for part in problem.get("loc", ())]
    param = location[-1] if location else None
    return error(400, f"{param}: {problem.get('msg', 'invalid value')}", "invalid_request", param)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logging.getLogger("ray.serve").exception("unhandled error on %s", request.url.path)
    return error(500, "internal server error; the error is in the replica's log", "internal_error")


def unauthorized() -> JSONResponse:
    return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")


def too_deep_body() -> JSONResponse:
    return error(400, f"the body's objects and arrays nest deeper than {MAX_NESTING} levels", "invalid_request")


def overloaded() -> EngineError:
    return EngineError("the server is at capacity (serve.max_queued_requests requests are waiting); retry later",
                       status=503, code="overloaded")


def _validation_error(exc: ValidationError) -> JSONResponse:
    param, message = request_problem(exc.errors())
    return error(400, message, "invalid_request", param)


@serve.deployment
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, serve_config: ServeSection, models: DeploymentHandle, organizations: Organizations,
                 fine_tuning: Any = None) -> None:
        from raytune_it.serving.adapters import AdapterCatalog
        from raytune_it.serving.metrics import ServeMetrics
        from raytune_it.serving.model_server import base_model_name

        self.config = serve_config
        self.organizations = organizations
        self.model_server = models
        self.base_name = base_model_name(serve_config)
        self.catalog = AdapterCatalog(serve_config.adapters, serve_config.adapter_root)
        self.metrics = ServeMetrics([self.base_name, *serve_config.adapters])
        self.fine_tuning = fine_tuning  # a FineTuningService, with serve.fine_tuning
        self._reconciler: asyncio.Task | None = None
        if fine_tuning is not None:
            try:  # jobs move on from the start, requests or not (else from the first request)
                self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_forever())
            except RuntimeError:
                pass

    # --- request plumbing ----------------------------------------------------------------

    def _organization(self, request: Request) -> str | None:
        """The caller's organization, or None for a missing or wrong key."""
        return self.organizations.of_bearer(request.headers.get("authorization", ""))

    def _authorized(self, request: Request) -> bool:
        return self._organization(request) is not None

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
        except RecursionError:  # past the interpreter's own limit, about 1,000 levels
            return too_deep_body()
        if nests_too_deep(raw, data):
            return too_deep_body()
        if not isinstance(data, dict):
            return error(400, "the body must be a JSON object", "invalid_request")
        if schema is None:  # the caller validates (its errors name the field too)
            return data
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

    def _route(self, model: str, organization: str | None = None) -> DeploymentHandle | EngineError:
        """The handle that reaches a replica able to serve ``model``: any replica for the base model, one
        holding (or loading) the adapter otherwise, through Serve's model multiplexing. A fine-tuned model
        is the caller's organization's, or does not exist."""
        if model == self.base_name:
            return self.model_server
        if self.fine_tuning is not None and model.startswith("ft:"):
            try:
                job_id = self.fine_tuning.servable(organization, model)
            except ApiError as exc:
                return EngineError(str(exc), status=exc.status, code=exc.code, param=exc.param)
            if job_id is not None:
                return self.model_server.options(multiplexed_model_id=model)
        if not self.catalog.knows(model):
            return EngineError(f"model {model!r} does not exist; available: "
                               f"{', '.join([self.base_name, *self.catalog.configured])}"
                               + (" and the adapters under serve.adapter_root" if self.catalog.root else ""),
                               status=404, code="model_not_found", param="model")
        return self.model_server.options(multiplexed_model_id=model)

    async def _generate(self, generation: GenerationRequest, organization: str | None = None
                        ) -> GenerationResult | EngineError:
        handle = await asyncio.to_thread(self._route, generation.model, organization)
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

    async def _respond(self, route: str, arrived: float, body: Any, chat: bool, organization: str | None,
                       **prompt: Any) -> Response:
        generation = self._generation(body, **prompt)
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            handle = await asyncio.to_thread(self._route, body.model, organization)
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
        result = await self._generate(generation, organization)
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
        organization = self._organization(request)
        if organization is None:
            return self._answer("/v1/models", arrived, "-", unauthorized())
        names = [self.base_name, *(await asyncio.to_thread(self.catalog.names))]
        tuned = await asyncio.to_thread(self.fine_tuning.models, organization) if self.fine_tuning else []
        return self._answer("/v1/models", arrived, "-", JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "raytune-it",
             "root": names[0], "parent": None if name == names[0] else names[0]} for name in names] + tuned}))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body = await self._body(request, CompletionRequest)
        if isinstance(body, Response):
            return self._answer("/v1/completions", arrived, "-", body)
        return await self._respond("/v1/completions", arrived, body, chat=False,
                                   organization=self._organization(request), prompt=body.prompt)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body = await self._body(request, ChatRequest)
        if isinstance(body, Response):
            return self._answer("/v1/chat/completions", arrived, "-", body)
        return await self._respond("/v1/chat/completions", arrived, body, chat=True,
                                   organization=self._organization(request),
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
                max_tokens=body.max_tokens, temperature=0.0, ignore_eos=body.ignore_eos),
                self._organization(request))
            if isinstance(result, EngineError):
                return self._refuse(route, arrived, body.model, result)
            self.metrics.observe(body.model, result, result.time_to_first_token_s)
            runs.append({"time_to_first_token_s": result.time_to_first_token_s, "latency_s": result.latency_s,
                         "time_per_output_token_s": result.time_per_output_token_s,
                         "tokens_per_second": result.tokens_per_second, "prompt_tokens": result.prompt_tokens,
                         "completion_tokens": result.completion_tokens})
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        handle = await asyncio.to_thread(self._route, body.model, self._organization(request))  # routed above
        assert not isinstance(handle, EngineError)
        info = await handle.info.remote()
        return self._answer(route, arrived, body.model, JSONResponse({
            "model": body.model, "batch_size": 1, "repeats": body.repeats, **info, "median": median, "runs": runs}))

    # --- the fine-tuning API (serve.fine_tuning) --------------------------------------------------

    async def _reconcile_forever(self) -> None:
        """Queued jobs start and finished ones are noticed without a request; a failure to reach Ray or
        storage is logged once per streak and tried again."""
        logger, failing = logging.getLogger("ray.serve"), False
        while True:
            try:
                await asyncio.to_thread(self.fine_tuning.reconcile)
                failing = False
            except Exception:  # noqa: BLE001 - the loop must outlive a storage or Ray hiccup
                if not failing:
                    logger.exception("fine-tuning jobs: reconciling with Ray failed; trying again")
                failing = True
            await asyncio.sleep(RECONCILE_EVERY_S)

    def _service(self, request: Request) -> tuple[Any, str] | Response:
        organization = self._organization(request)
        if organization is None:
            return unauthorized()
        if self.fine_tuning is None:
            return error(404, f"no route {request.url.path}: the fine-tuning API is off; start the app with "
                              "serve.fine_tuning=true", "not_found")
        if self._reconciler is None or self._reconciler.done():
            self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_forever())
        return self.fine_tuning, organization

    async def _call(self, request: Request, route: str, method: str, *args: Any) -> Response:
        arrived = time.perf_counter()
        found = self._service(request)
        if isinstance(found, Response):
            return self._answer(route, arrived, "-", found)
        service, organization = found
        try:
            result = await asyncio.to_thread(getattr(service, method), organization, *args)
        except ApiError as exc:
            return self._answer(route, arrived, "-", error(exc.status, str(exc), exc.code, exc.param))
        return self._answer(route, arrived, "-", JSONResponse(result))

    @api.post("/v1/files")
    async def create_file(self, request: Request) -> Response:
        route, arrived = "/v1/files", time.perf_counter()
        found = self._service(request)
        if isinstance(found, Response):
            return self._answer(route, arrived, "-", found)
        service, organization = found
        limit = self.config.max_file_bytes
        try:
            if int(request.headers.get("content-length") or 0) > limit + 64 * 1024:  # the form's own bytes
                from raytune_it.service.files import too_large

                raise too_large(limit)
            document = await service.upload(organization, request.stream(),
                                            request.headers.get("content-type", ""), limit)
        except ApiError as exc:
            return self._answer(route, arrived, "-", error(exc.status, str(exc), exc.code, exc.param))
        return self._answer(route, arrived, "-", JSONResponse(document))

    @api.get("/v1/files")
    async def list_files(self, request: Request, purpose: str | None = None, after: str | None = None,
                         limit: int = 20, order: Literal["asc", "desc"] = "desc") -> Response:
        return await self._call(request, "/v1/files", "list_files", purpose, after, limit, order)

    @api.get("/v1/files/{file_id}")
    async def retrieve_file(self, request: Request, file_id: str) -> Response:
        return await self._call(request, "/v1/files/{id}", "get_file", file_id)

    @api.delete("/v1/files/{file_id}")
    async def delete_file(self, request: Request, file_id: str) -> Response:
        return await self._call(request, "/v1/files/{id}", "delete_file", file_id)

    @api.get("/v1/files/{file_id}/content")
    async def file_content(self, request: Request, file_id: str) -> Response:
        route, arrived = "/v1/files/{id}/content", time.perf_counter()
        found = self._service(request)
        if isinstance(found, Response):
            return self._answer(route, arrived, "-", found)
        service, organization = found
        try:
            chunks = await asyncio.to_thread(service.file_content, organization, file_id)
        except ApiError as exc:
            return self._answer(route, arrived, "-", error(exc.status, str(exc), exc.code, exc.param))

        async def body():  # storage reads off the event loop, a chunk at a time
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield chunk

        return self._answer(route, arrived, "-", StreamingResponse(body(), media_type="application/octet-stream"))

    @api.post("/v1/fine_tuning/jobs")
    async def create_job(self, request: Request) -> Response:
        route, arrived = "/v1/fine_tuning/jobs", time.perf_counter()
        body = await self._body(request, None)
        if isinstance(body, Response):
            return self._answer(route, arrived, "-", body)
        return await self._call(request, route, "create_job", body)

    @api.get("/v1/fine_tuning/jobs")
    async def list_jobs(self, request: Request, after: str | None = None, limit: int = 20) -> Response:
        return await self._call(request, "/v1/fine_tuning/jobs", "list_jobs", after, limit)

    @api.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(self, request: Request, job_id: str) -> Response:
        return await self._call(request, "/v1/fine_tuning/jobs/{id}", "get_job", job_id)

    @api.post("/v1/fine_tuning/jobs/{job_id}/{action}")
    async def job_action(self, request: Request, job_id: str, action: str) -> Response:
        if action not in ("cancel", "pause", "resume"):
            return error(404, f"no route {request.url.path}; a job takes cancel, pause or resume", "not_found")
        return await self._call(request, f"/v1/fine_tuning/jobs/{{id}}/{action}", action, job_id)

    @api.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(self, request: Request, job_id: str, after: str | None = None, limit: int = 20) -> Response:
        return await self._call(request, "/v1/fine_tuning/jobs/{id}/events", "events", job_id, after, limit)

    @api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(self, request: Request, job_id: str, after: str | None = None,
                              limit: int = 10) -> Response:
        return await self._call(request, "/v1/fine_tuning/jobs/{id}/checkpoints", "checkpoints", job_id, after,
                                limit)


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
    # The keys are resolved here, where the user gave them (config, keys file or this process's environment),
    # and only their digests go to the ingress: replicas on an attached cluster do not see the driver's
    # environment, and no replica holds a key.
    organizations = load_organizations(config.serve.resolved_api_key(), config.serve.api_keys_file)
    serve_config = config.serve.model_copy(update={"api_key": None})
    fine_tuning = fine_tuning_service(config)
    fine_tuned_root = fine_tuning.store.runs().uri if fine_tuning is not None else None
    # (serve.deployment made both classes Deployments, which mypy cannot see)
    models = ModelServer.options(**deployment_options(config)).bind(  # type: ignore[attr-defined]
        serve_config, fine_tuned_root)
    return OpenAIServer.options(**ingress_options(config)).bind(  # type: ignore[attr-defined]
        serve_config, models, organizations, fine_tuning)


def fine_tuning_service(config: JobConfig) -> Any:
    """With serve.fine_tuning: the service, built on the driver from the app's own config (without its key),
    its storage checked writable now rather than at the first upload."""
    if not config.serve.fine_tuning:
        return None
    from raytune_it.service.jobs import FineTuningService
    from raytune_it.serving.model_server import base_model_name
    from raytune_it.storage import check_writable

    template = config.model_copy(update={"serve": config.serve.model_copy(update={"api_key": None})})
    service = FineTuningService(template, base_model_name(config.serve))
    check_writable(service.store.root, "run.storage")
    return service


def app_builder(args: dict) -> Any:
    """For ``serve run`` / ``serve deploy``: args ``config`` (preset or YAML) and ``overrides`` (a list)."""
    from raytune_it.config import load_config

    config = load_config(args.get("config"), list(args.get("overrides", [])))
    return build_app(config)
