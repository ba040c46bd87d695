"""Turning a preset name or YAML file plus ``a.b=value`` overrides into a JobConfig.

Overrides take YAML values, so ``lora.target_modules=[q_proj,v_proj]`` and
``tune.search_space={"lora.rank": [4, 16]}`` work from a shell. Every failure is
a :class:`ConfigError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from raytune_it.config.schema import JobConfig
from raytune_it.errors import ConfigError

if TYPE_CHECKING:
    from raytune_it.storage import Location

#: A preset marks a value the user must supply with this (OmegaConf's convention).
MISSING = "???"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_.]*)*$")


def preset_names() -> list[str]:
    folder = resources.files("raytune_it.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_source(source: str) -> tuple[dict[str, Any], str]:
    """Read a YAML file (a path or storage URI) or a bundled preset name; return (mapping, label)."""
    from raytune_it.storage import is_uri, open_location, redact_uri, storage_cause

    path = Path(os.path.expanduser(source))
    if is_uri(source):  # a config in storage: a fine-tuning job's, written by the service
        label = redact_uri(source)
        try:
            text = open_location(source, "config").read_text()
        except OSError as exc:
            raise ConfigError(f"config file {label}: cannot read it: {storage_cause(exc)}") from None
    elif path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {source!r} does not exist. Pass a YAML file or one of the presets: "
                              f"{', '.join(preset_names())}")
        text, label = path.read_text(encoding="utf-8"), str(path)
    else:
        names = preset_names()
        if source not in names:
            hint = difflib.get_close_matches(source, names, n=1)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown preset {source!r}.{did_you_mean} Presets: {', '.join(names)}; "
                              "or pass the path of a YAML file.")
        text = (resources.files("raytune_it.config") / "presets" / f"{source}.yaml").read_text(encoding="utf-8")
        label = f"preset {source}"
    data = parse_yaml(text, label) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data, label


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'lora.rank=32'`` -> (['lora', 'rank'], 32)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise ConfigError(f"override {text!r} is not of the form section.key=value (for example lora.rank=32)")
    value = parse_yaml(raw, f"override {key}: value {raw[:80]!r}") if raw.strip() else ""
    return key.split("."), value


def parse_yaml(text: str, label: str) -> Any:
    """YAML from a user (a config file, an override's value), or a ConfigError that names ``label``: for
    text that is not YAML, and for nesting so deep that the parser recurses past Python's limit."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{label}: its mappings and lists nest hundreds of levels deep; a config nests "
                          "a few") from None


def apply_override(data: dict[str, Any], path: Sequence[str] | str, value: Any) -> None:
    """Set ``value`` at a dotted path (``"lora.rank"`` or its parts) in a config mapping: the one walk
    over config paths that overrides, sweeps and derived stage configs share."""
    path = path.split(".") if isinstance(path, str) else path
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"override {'.'.join(path)}: {where} is a value ({child!r}), not a section")
        node = child
    node[path[-1]] = value


def config_value(config: Any, path: str) -> Any:
    """The value at a dotted path of a JobConfig (or of any nested sections)."""
    node = config
    for part in path.split("."):
        node = getattr(node, part)
    return node


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config mapping as ``{"lora.rank": 16, ...}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def with_overrides(config: JobConfig, changes: Mapping[str, Any] | Sequence[str],
                   label: str = "config") -> JobConfig:
    """A new config derived from ``config``, validated as a loaded one is: the one way to derive a config
    (a sweep's trials, eval's adapter runs, ``raytune-it run``'s stages). ``changes`` maps dotted keys to
    values (``{"train.max_steps": 8}``; a section given as a dict replaces that section) or is a list of
    ``a.b=value`` override strings. The original is never changed; secrets are kept (a derived job serves
    with the key the user set; saving drops it)."""
    data = config.to_dict(include_secrets=True)
    items = changes.items() if isinstance(changes, Mapping) else [parse_override(text) for text in changes]
    for path, value in items:
        apply_override(data, path, value)
    return validate(data, label)


def _missing_keys(data: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _missing_keys(value, f"{prefix}{key}.")
    elif data == MISSING:
        yield prefix.rstrip(".")


def _allowed_keys(loc: Sequence[Any]) -> list[str]:
    model: type[BaseModel] = JobConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return list(model.model_fields)


def _describe(error: Any) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        did_you_mean = f" Did you mean {'.'.join(loc[:-1] + [hint[0]])!r}?" if hint else ""
        section = ".".join(loc[:-1]) or "the top level"
        allowed_text = ", ".join(allowed) if allowed else "(none yet)"
        return f"{key}: unknown key.{did_you_mean} Allowed in {section}: {allowed_text}"
    from raytune_it.storage import redact_uri

    if not loc:  # a rule across sections: its message names its keys, and the input is the whole config
        return error["msg"].removeprefix("Value error, ")
    return f"{key}: got {redact_uri(repr(error.get('input')))}; {error['msg'][0].lower()}{error['msg'][1:]}"


def validate(data: dict[str, Any], label: str = "config") -> JobConfig:
    """Validate a plain mapping into a JobConfig, or raise ConfigError listing every problem."""
    missing = list(_missing_keys(data))
    if missing:
        lines = [f"{key}: required by {label}; set it, e.g. {key}=..." for key in missing]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"invalid config ({label}):\n  " + "\n  ".join(lines)) from None


def load_config(source: str | None = None, overrides: Sequence[str] = (), *, check_paths: bool = True) -> JobConfig:
    """Load a preset or YAML file, apply dotted overrides, validate.

    ``check_paths`` also checks that model and data paths exist on this machine; the
    driver does this before launching, workers (which may see other mounts) do not.
    """
    data, label = _read_source(source) if source else ({}, "defaults")
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    config = validate(data, label)
    if check_paths:
        from raytune_it.config.paths import check_paths as _check

        _check(config)
    return config


def load_run_config(path: "str | Path | Location") -> JobConfig:
    """Read back a run's ``config.yaml`` (as written by :func:`save_config`), from any storage."""
    from raytune_it.storage import as_location

    location = as_location(path)
    if location.is_local:
        data, label = _read_source(location.path)
    else:
        data, label = parse_yaml(location.read_text(), location.uri) or {}, location.uri
    return validate(data, label)


def save_config(config: JobConfig, folder: "str | Path | Location") -> "Location":
    """Write ``config.yaml`` into a run folder on any storage, without secrets (JobConfig.to_yaml)."""
    from raytune_it.storage import as_location

    target = as_location(folder) / "config.yaml"
    target.write_text(config.to_yaml())
    return target
