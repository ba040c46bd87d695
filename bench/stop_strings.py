"""What stop strings cost a streamed answer: tokens/s of a 1,000-token streamed completion with 3 stop
strings against none, on each engine, in one run.

    python bench/stop_strings.py [--max-tokens 1000] [--rounds 3] [--engines transformers vllm]

Each engine (the one the Serve app runs, on the tiny model) streams the same greedy completion, with EOS
ignored so that every answer is ``--max-tokens`` long, and stop strings that never occur in it, so that
both answers are the same tokens and only the stop check differs. Rounds alternate the two; medians of
the decode rate (tokens after the first / the time after it) are reported.

For the transformers engine it also runs today's scanner as it was before stop strings became linear
(``QuadraticStopScanner``: every token decoded the whole answer again and searched all of it), so the
ratio before sits beside the ratio now. The vLLM engine used that scanner too, over vLLM's token ids
with its own detokenizer off; it now uses vLLM's detokenizer and ``SamplingParams(stop=...)``, so there
is no old vLLM path left to run. vLLM needs ``.venv-vllm`` (``--engines`` picks what is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from typing import Any, Iterator

PROMPT = "Write a long story about a lighthouse keeper and the sea."
#: Three stop strings the tiny model's greedy answer never writes.
STOPS = ["\n### Instruction:", "[[end of answer]]", "<<stop here>>"]


class QuadraticStopScanner:
    """The stop-string scanner before #28 (``engines/base.StopScanner`` at 8227d2c^), for the "before"
    figure only: each update decodes every token so far and looks for each stop string in all of it."""

    def __init__(self, tokenizer: Any, stop: list[str], prompt_ids: Any = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.text, self.sent, self.stopped = "", 0, False

    def update(self, tokens: list[int]) -> str:
        self.text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((self.text.find(s) for s in self.stop if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        ready = len(self.text) if self.stopped else self._safe_length()
        piece = self.text[self.sent:ready] if ready > self.sent else ""
        self.sent = max(self.sent, ready)
        return piece

    def finish(self) -> str:
        piece = self.text[self.sent:]
        self.sent = len(self.text)
        return piece

    def _safe_length(self) -> int:
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        held = max((size for stop in self.stop for size in range(1, len(stop))
                    if self.text[:end].endswith(stop[:size])), default=0)
        return end - held


@contextlib.contextmanager
def scanner(kind: str) -> Iterator[None]:
    from raytune_it.serving.engines import transformers_engine

    own = transformers_engine.StopScanner
    if kind == "before":
        transformers_engine.StopScanner = QuadraticStopScanner  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        transformers_engine.StopScanner = own  # type: ignore[misc]


def rate(thread: Any, engine: Any, stop: list[str], max_tokens: int) -> float:
    from raytune_it.serving.engines.base import GenerationRequest

    request = GenerationRequest(model="tiny-llama", prompt=PROMPT, max_tokens=max_tokens, temperature=0.0,
                                stop=list(stop), ignore_eos=True)

    async def streamed() -> Any:
        result, text = None, ""
        async for chunk in engine.stream(request):
            text += chunk.text
            result = chunk.result or result
        return result, text

    result, text = thread.run(streamed())
    if result.completion_tokens != max_tokens or result.text != text:
        raise SystemExit(f"a stop string ended the answer, or the stream differs from it: {result}")
    return result.tokens_per_second


def measure(engine_name: str, max_tokens: int, rounds: int) -> dict[str, float]:
    from raytune_it.config import load_config
    from raytune_it.models.loading import resolve_model_path
    from raytune_it.serving.engines import create_engine
    from raytune_it.serving.engines.base import EngineThread

    overrides = [f"serve.engine={engine_name}", "serve.max_model_len=2048", f"serve.max_tokens_limit={max_tokens}"]
    config = load_config("tiny-lora", overrides).serve
    variants = [("now", "none", []), ("now", "stop", STOPS)]
    if engine_name == "transformers":
        variants += [("before", "none", []), ("before", "stop", STOPS)]
    thread = EngineThread()
    engine = thread.call(lambda: create_engine(config, str(resolve_model_path("tiny-llama")), "tiny-llama", None))
    rates: dict[str, list[float]] = {f"{kind} {name}": [] for kind, name, _ in variants}
    try:
        rate(thread, engine, [], 32)  # warm-up
        for round_ in range(rounds):
            for kind, name, stop in variants:
                with scanner(kind):
                    value = rate(thread, engine, stop, max_tokens)
                rates[f"{kind} {name}"].append(value)
                print(f"{engine_name} round {round_ + 1}/{rounds}, {kind}, {name}: {value:,.1f} tokens/s", flush=True)
    finally:
        thread.call(engine.shutdown)
        thread.close()
    return {key: statistics.median(values) for key, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=1000, help="tokens of each streamed answer")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--engines", nargs="+", choices=["transformers", "vllm"],
                        help="default: transformers, and vLLM where it is installed")
    args = parser.parse_args()
    engines = args.engines
    if engines is None:
        import importlib.util

        engines = ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    results = {engine: measure(engine, args.max_tokens, args.rounds) for engine in engines}
    print(f"\ntiny-llama on CPU, one streamed greedy answer of {args.max_tokens} tokens, {len(STOPS)} stop strings "
          f"against none, median of {args.rounds} rounds (tokens/s)")
    for engine, medians in results.items():
        for key, value in medians.items():
            print(f"{engine:>12} {key:<12} {value:,.1f}")
    for engine, medians in results.items():
        before = (f"; before #28: {medians['before stop'] / medians['before none']:.2f}x"
                  if "before stop" in medians else "")
        print(f"stop/no-stop ({engine}): {medians['now stop'] / medians['now none']:.2f}x{before}")


if __name__ == "__main__":
    main()
