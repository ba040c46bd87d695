"""The model deployment: one engine per replica, adapters loaded on demand with Serve's model multiplexing.

The HTTP ingress (``app.py``) calls it through a deployment handle with ``multiplexed_model_id`` set to
the adapter a request names, so Serve routes the request to a replica that already holds that adapter
and, on a replica without it, ``@serve.multiplexed`` loads it (checked first, see ``adapters``) and evicts
the least recently used one past ``serve.max_adapters_per_replica``. Requests for the base model carry no
model id and go to any replica.

Errors a client caused travel back as ``EngineError`` values, not exceptions, so the ingress answers them
with their own status whatever Serve does with exceptions on the way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from ray import serve

from raytune_it.config.schema import ServeSection
from raytune_it.serving.adapters import AdapterCatalog, check_adapter, read_base_config
from raytune_it.serving.engines.base import EngineError, GenerationRequest, GenerationResult, StreamChunk
from raytune_it.storage import folder_name

logger = logging.getLogger("ray.serve")

# Streamed text crosses two Serve hops per chunk; one chunk per token would cost more than a small model's
# token takes, so text is sent at most every 50 ms (as Ray Serve LLM batches its streams). The first chunk
# and the last go at once.
STREAM_BATCH_S = 0.05


async def coalesce(chunks: AsyncIterator[StreamChunk], interval: float) -> AsyncIterator[StreamChunk]:
    pending, sent_at = "", None
    async for chunk in chunks:
        pending += chunk.text
        now = time.monotonic()
        if chunk.result is not None or sent_at is None or now - sent_at >= interval:
            yield StreamChunk(pending, chunk.result)
            pending, sent_at = "", now
    if pending:
        yield StreamChunk(pending)


def internal_error(request: GenerationRequest) -> EngineError:
    logger.exception("generation for model %r failed", request.model)
    return EngineError("the server failed to generate; the error is in the replica's log", status=500,
                       code="internal_error")


def base_model_name(serve_config: ServeSection) -> str:
    return serve_config.model_name or folder_name(serve_config.base_model)


class LoadedAdapter:
    """What the multiplexer caches per adapter; Serve calls ``__del__`` when it evicts one."""

    def __init__(self, server: "ModelServer", name: str, folder: str) -> None:
        self.server, self.name, self.folder = server, name, folder

    def __del__(self) -> None:
        # Serve calls this on eviction and Python again at collection: only the adapter still current unloads.
        server = self.__dict__.get("server")
        if server is not None and server.loaded.get(self.name) is self:
            del server.loaded[self.name]
            server.engine.unload_adapter(self.name)


@serve.deployment
class ModelServer:
    def __init__(self, serve_config: ServeSection, fine_tuned_root: str | None = None) -> None:
        from raytune_it.models.loading import resolve_model_path
        from raytune_it.quiet import quiet_library_noise
        from raytune_it.serving.engines import create_engine

        quiet_library_noise()  # once per replica, before the engine imports the libraries

        base_path = resolve_model_path(serve_config.base_model, "serve.base_model")
        self.base_name = base_model_name(serve_config)
        self.catalog = AdapterCatalog(serve_config.adapters, serve_config.adapter_root, fine_tuned_root)
        self.base_config = read_base_config(base_path)
        max_rank = serve_config.max_lora_rank or self.catalog.max_rank()
        self.engine = create_engine(serve_config, base_path, self.base_name, max_rank)
        self.max_rank = getattr(self.engine, "max_lora_rank", None)
        self.loaded: dict[str, LoadedAdapter] = {}
        self.abandoned_streams = 0

        async def load(name: str) -> LoadedAdapter:  # Serve multiplexes plain functions, not bound methods
            return await self._load_adapter(name)

        self._adapter = serve.multiplexed(max_num_models_per_replica=serve_config.max_adapters_per_replica)(load)

    async def _load_adapter(self, name: str) -> LoadedAdapter:
        folder = await asyncio.to_thread(self.catalog.local_folder, name)
        await asyncio.to_thread(check_adapter, name, folder, self.base_config, self.max_rank)
        await asyncio.to_thread(self.engine.load_adapter, name, str(folder))
        self.loaded[name] = LoadedAdapter(self, name, str(folder))
        return self.loaded[name]

    async def _prepare(self, request: GenerationRequest) -> GenerationRequest:
        if request.model != self.base_name:
            if request.model != serve.get_multiplexed_model_id():
                raise EngineError("an adapter request must be routed with its name as multiplexed_model_id",
                                  status=500, code="routing_error")
            request.adapter_folder = (await self._adapter(request.model)).folder
        return request

    # --- what the ingress calls ----------------------------------------------------------------

    def info(self) -> dict[str, str]:
        return self.engine.info()

    def loaded_adapters(self) -> list[str]:
        """This replica's adapters, least recently loaded first (for operators and tests)."""
        return list(self.loaded)

    def stats(self) -> dict[str, int]:
        """This replica's counts: tokens its engine generated and streams their clients abandoned."""
        return {"tokens_generated": self.engine.tokens_generated, "abandoned_streams": self.abandoned_streams}

    async def generate(self, request: GenerationRequest) -> GenerationResult | EngineError:
        try:
            return await self.engine.generate(await self._prepare(request))
        except EngineError as exc:
            return exc
        except Exception:  # noqa: BLE001 - logged here; the client gets a JSON 500, the replica goes on
            return internal_error(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk | EngineError]:
        """Chunks of text, the last with the result; or a single EngineError, before any text."""
        try:
            request = await self._prepare(request)
            await asyncio.to_thread(self.engine.prompt_ids, request)  # refuse before the stream starts
            finished, stream = False, self.engine.stream(request)  # async generators: they have aclose()
            chunks = coalesce(stream, STREAM_BATCH_S)
            try:
                async for chunk in chunks:
                    finished = chunk.result is not None
                    yield chunk
            finally:  # closed early (the client left): closing the engine's stream stops its generation now
                await chunks.aclose()  # type: ignore[attr-defined]  # async generators, both
                await stream.aclose()  # type: ignore[attr-defined]
                self.abandoned_streams += not finished
        except EngineError as exc:
            yield exc
        except Exception:  # noqa: BLE001 - as in generate
            yield internal_error(request)

    def __del__(self) -> Any:
        engine = self.__dict__.get("engine")
        if engine is not None:
            engine.shutdown()
