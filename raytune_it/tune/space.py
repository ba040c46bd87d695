"""The search space: config paths mapped to values, expanded into validated trials.

Every trial is a list of ``path=value`` overrides on the sweep's base config, and
each one is validated exactly like a single run before any trial starts. The
trials are enumerated here (grid: the cartesian product; random: seeded draws),
so combinations that cannot fit in memory can be left out with a reason, and the
same list is what Tune runs.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from raytune_it.config.loading import config_value, with_overrides
from raytune_it.config.paths import check_paths, path_settings
from raytune_it.config.schema import JobConfig
from raytune_it.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
#: Sweeping these would change what a trial *is*, not how it trains.
NOT_SWEEPABLE = ("tune.", "run.", "serve.")


@dataclass
class Trial:
    index: int
    params: dict[str, Any]
    config: JobConfig
    skipped_reason: str | None = None
    memory_bytes: int | None = None
    overrides: list[str] = field(default_factory=list)


def _check_path(path: str) -> None:
    if path.startswith(NOT_SWEEPABLE):
        raise ConfigError(f"tune.search_space: {path!r} cannot be swept (tune.*, run.* and serve.* are per sweep)")
    model: type[BaseModel] = JobConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"tune.search_space: {path!r} is not a config path; keys in {where}: "
                              f"{', '.join(fields)}")
        annotation = fields[part].annotation
        last = i == len(parts) - 1
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if last and is_section:
            raise ConfigError(f"tune.search_space: {path!r} is a section; sweep one of its keys")
        if not last:
            if not is_section:
                raise ConfigError(f"tune.search_space: {path!r}: {'.'.join(parts[:i + 1])} is not a section")
            model = annotation  # type: ignore[assignment]  # a BaseModel subclass: checked above


def _values(path: str, spec: Any) -> list[Any] | tuple[str, list[Any]]:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"tune.search_space.{path}: the list of values is empty")
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        [(kind, args)] = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"tune.search_space.{path}: unknown distribution {kind!r}; use a list of values or "
                              f"one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
            raise ConfigError(f"tune.search_space.{path}: {kind} takes "
                              f"{'a non-empty list' if kind == 'choice' else '[low, high]'}, got {args!r}")
        if kind != "choice":
            try:  # YAML reads 1e-5 (no dot) as a string
                args = [float(a) if kind != "randint" else int(a) for a in args]
            except (TypeError, ValueError):
                raise ConfigError(f"tune.search_space.{path}: {kind} bounds must be numbers, got {args!r}") from None
        if kind == "loguniform" and min(args) <= 0:
            raise ConfigError(f"tune.search_space.{path}: loguniform bounds must be > 0, got {args!r}")
        return (kind, args)
    raise ConfigError(f"tune.search_space.{path}: got {spec!r}; give a list of values or a distribution such as "
                      "{loguniform: [1e-5, 1e-3]}")


def _draw(rng: random.Random, spec: list[Any] | tuple[str, list[Any]]) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    kind, args = spec
    if kind == "choice":
        return rng.choice(args)
    if kind == "uniform":
        return rng.uniform(*args)
    if kind == "randint":
        return rng.randint(*args)
    low, high = math.log(args[0]), math.log(args[1])
    return float(f"{math.exp(rng.uniform(low, high)):.3g}")


def expand_trials(base: JobConfig) -> list[Trial]:
    """Validate the space and every trial config; raise ConfigError naming the key on the first problem."""
    tune = base.tune
    space = tune.search_space
    if not space:
        raise ConfigError('tune.search_space is empty; give config paths to sweep, e.g. '
                          'tune.search_space={"lora.rank": [4, 16], "train.micro_batch_size": [1, 2]}')
    specs = {}
    for path, spec in space.items():
        _check_path(path)
        specs[path] = _values(path, spec)
    if tune.search == "grid":
        maybe_lists = [spec if isinstance(spec, list) else spec[1] if spec[0] == "choice" else None
                       for spec in specs.values()]
        lists = [values for values in maybe_lists if values is not None]
        if len(lists) < len(maybe_lists):
            raise ConfigError("tune.search=grid needs lists of values; continuous distributions need "
                              "tune.search=random")
        combos = [dict(zip(specs, values)) for values in itertools.product(*lists)]
    else:
        rng = random.Random(tune.seed)
        combos = [{path: _draw(rng, spec) for path, spec in specs.items()} for _ in range(tune.num_samples)]
    trials = []
    checked = set(path_settings(base))  # load_config checked the base's; a swept model or data path is new
    for index, params in enumerate(combos):
        try:
            config = with_overrides(base, {"tune": {}, **params}, f"trial {index}")
            check_paths(config, checked)
        except ConfigError as exc:
            raise ConfigError(f"tune.search_space: trial {index} ({_label(params)}) is not a valid config: "
                              f"{exc}") from None
        # Report the validated, typed values (YAML reads 1e-3 as a string; the config holds a float).
        params = {path: config_value(config, path) for path in params}
        trials.append(Trial(index=index, params=params, config=config,
                            overrides=[f"{k}={json.dumps(v)}" for k, v in params.items()]))
    return trials


def _label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
