"""Answers from a set of models, through the serving engines, in batches: what eval and ``raytune-it generate``
both run.

A model is a base model (a folder, storage URI, hub id or tiny model), a fully tuned export, or a peft
adapter, which runs on the base's engine as a served adapter does. Each model is asked in its own prompt
format (``PromptFormat.of_model``: the one saved with its export), the base in the run's format, so eval
and generation send the very prompt ids training built. Engines are the serving engines (transformers or
vLLM, ``serve.engine``); adapters share their base's engine, and a full model's engine is shut down once its
answers are in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from raytune_it.config.schema import ServeSection
from raytune_it.data.prompt_format import PromptFormat
from raytune_it.serving.engines.base import EngineError, EngineThread, GenerationRequest, GenerationResult


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn: greedy by default, as eval scores them."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Answer:
    prompt: str
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    weights: str  # the local folder the engine loads
    adapter: str | None  # a local adapter folder on those weights


def resolve_models(base: str, models: Mapping[str, str], where: str) -> list[ModelEntry]:
    """Local folders for every model, fetched or built once: an adapter folder runs on ``base``."""
    from raytune_it.models.loading import resolve_model_path

    base_folder = resolve_model_path(base, where)
    entries = []
    for name, path in models.items():
        folder = base_folder if path == base else resolve_model_path(path, where)
        if (Path(folder) / "adapter_config.json").is_file():
            entries.append(ModelEntry(name, base_folder, folder))
        else:
            entries.append(ModelEntry(name, folder, None))
    return entries


class Answerer:
    """Answers items (``PromptFormat.prompt_text``'s: Alpaca records, conversations, plain prompts) with one
    model at a time, ``batch_size`` prompts per engine call (None: what the engine takes at once,
    ``Engine.prompts_per_batch``).

    ``models`` are every model it will be asked to run: an engine is started with room for the largest rank
    among the adapters that run on its weights and for the modules they touch alone, and without adapter
    support where none runs (vLLM's LoRA layers cost every request, the base's too, and their cost grows
    with the rank reserved and the layers wrapped)."""

    def __init__(self, serve_config: ServeSection, data: Any, batch_size: int | None,
                 models: Sequence[ModelEntry]) -> None:
        from raytune_it.quiet import quiet_library_noise

        quiet_library_noise()  # eval's driver and each generate actor load models: once per process
        self.serve_config, self.data, self.batch_size = serve_config, data, batch_size
        self.adapters = adapter_needs(models)
        self.runner = EngineThread()
        self.engines: dict[str, Any] = {}

    def engine(self, weights: str) -> Any:
        from raytune_it.serving.engines import create_engine

        if weights not in self.engines:
            needs = self.adapters.get(weights)
            self.engines[weights] = create_engine(
                self.serve_config, weights, Path(weights).name, needs.rank if needs else None,
                needs.target_modules if needs else None)
        return self.engines[weights]

    def prompt_format(self, entry: ModelEntry) -> PromptFormat:
        tokenizer = self.engine(entry.weights).tokenizer
        run_format = PromptFormat.for_run(tokenizer, self.data)
        return PromptFormat.of_model(entry.adapter or entry.weights, tokenizer, run_format) \
            if entry.adapter is not None else _own_or_run(entry, tokenizer, run_format)

    def answers(self, entry: ModelEntry, items: Sequence[Mapping[str, Any]],
                sampling: Sampling) -> Iterator[list[Answer]]:
        """Batches of answers, in the order of ``items``."""
        engine = self.engine(entry.weights)
        if entry.adapter is not None:
            engine.load_adapter(entry.name, entry.adapter)
        prompt_format = self.prompt_format(entry)
        limit = int(self.serve_config.max_model_len)
        size = self.batch_size or engine.prompts_per_batch
        for start in range(0, len(items), size):
            batch = items[start:start + size]
            texts = [prompt_format.prompt_text(item) for item in batch]
            requests: list[tuple[int, GenerationRequest]] = []
            answers: list[Answer | None] = [None] * len(batch)
            for index, text in enumerate(texts):
                ids = prompt_format.text_ids(text)
                if len(ids) + sampling.max_new_tokens > limit:
                    answers[index] = Answer(text, "", len(ids), 0, "error", error=(
                        f"the prompt ({len(ids)} tokens) plus max_new_tokens ({sampling.max_new_tokens}) "
                        f"exceeds serve.max_model_len={limit}"))
                    continue
                requests.append((index, GenerationRequest(
                    model=entry.name, prompt=ids, max_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                    stop=prompt_format.stop_strings, stop_token_ids=prompt_format.stop_token_ids,
                    adapter_folder=entry.adapter)))
            try:
                results: list[GenerationResult] = self.runner.run(
                    engine.generate_batch([request for _, request in requests])) if requests else []
            except EngineError as exc:  # a request the engine refuses fails its batch's rows, not the job
                results = [GenerationResult("", len(request.prompt or []), 0, "error", 0.0, 0.0)
                           for _, request in requests]
                failed: str | None = str(exc)
            else:
                failed = None
            for (index, _), result in zip(requests, results):
                answers[index] = Answer(texts[index], result.text.strip(), result.prompt_tokens,
                                        result.completion_tokens, result.finish_reason, error=failed)
            yield [answer for answer in answers if answer is not None]

    def release(self, entry: ModelEntry, keep: Sequence[ModelEntry] = ()) -> None:
        """Shut down the engine of ``entry``'s weights unless a model still to come runs on it."""
        if any(other.weights == entry.weights for other in keep):
            return
        engine = self.engines.pop(entry.weights, None)
        if engine is not None:
            self.runner.call(engine.shutdown)

    def close(self) -> None:
        for engine in self.engines.values():
            self.runner.call(engine.shutdown)
        self.engines.clear()
        self.runner.close()


@dataclass(frozen=True)
class AdapterNeeds:
    """What the adapters on one base's weights need of its engine: the largest rank, and the modules they
    touch (None: any, where one adapter names its modules by a pattern)."""

    rank: int
    target_modules: tuple[str, ...] | None


def adapter_needs(models: Sequence[ModelEntry]) -> dict[str, AdapterNeeds]:
    """Per base weights, from the adapters' configs alone."""
    import json

    from raytune_it.serving.adapters import lora_rank

    needs: dict[str, AdapterNeeds] = {}
    for entry in models:
        if entry.adapter is None:
            continue
        config = json.loads((Path(entry.adapter) / "adapter_config.json").read_text())
        targets = config.get("target_modules")
        before = needs.get(entry.weights, AdapterNeeds(0, ()))
        modules = tuple(sorted({*before.target_modules, *targets})) \
            if isinstance(targets, list) and before.target_modules is not None else None
        needs[entry.weights] = AdapterNeeds(max(before.rank, lora_rank(config)), modules)
    return needs


def _own_or_run(entry: ModelEntry, tokenizer: Any, run_format: PromptFormat) -> PromptFormat:
    """A full model's format: the one saved with it when it is an export of a run (``config.yaml`` beside
    or above it), else the run's format, as the base is asked."""
    folder = Path(entry.weights)
    is_export = any((f / "config.yaml").is_file() for f in (folder, folder.parent))
    return PromptFormat.of_model(entry.weights, tokenizer, run_format) if is_export else run_format
