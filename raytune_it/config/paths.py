"""Checks that the paths a config names exist, done on the driver before launch.

A hub id (``meta-llama/Llama-2-7b-hf``) is accepted without a local directory;
anything that looks like a filesystem path must exist.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from raytune_it.builtins import TINY_MODEL_NAMES
from raytune_it.config.schema import JobConfig
from raytune_it.errors import ConfigError
from raytune_it.models.folders import TOKENIZER_FILES, model_folder_problem
from raytune_it.storage import is_uri, storage_cause

BUILTIN_MODELS = TINY_MODEL_NAMES
RECORDS_FILE = ".json, .jsonl or .parquet file of records (data.format: alpaca, messages, sharegpt or prompt)"
BUILTIN_DATA = ("builtin:tasks",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def check_model_path(name: str, key: str = "model.name_or_path", *, adapter_ok: bool = False) -> None:
    """A model directory (or, with ``adapter_ok``, a peft adapter directory) that exists, locally or in storage,
    and holds what loading it needs."""
    if name in BUILTIN_MODELS:
        return
    if is_uri(name):
        check_stored_model(name, key, adapter_ok=adapter_ok)
        return
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        files = {child.name for child in path.iterdir()}
        problem = model_folder_problem(files, lambda file: (path / file).read_bytes(), adapter_ok=adapter_ok)
        if problem:
            raise ConfigError(f"{key}: {name!r} {problem}")
        return
    if path.exists():
        raise ConfigError(f"{key}: {name!r} is a file; point it at a Hugging Face model directory")
    if looks_like_hub_id(name):
        return
    raise ConfigError(f"{key}: {name!r} does not exist. Allowed: a local Hugging Face model directory, "
                      f"a hub id such as org/model, or one of {', '.join(BUILTIN_MODELS)}")


def check_tokenizer_path(name: str, key: str) -> None:
    """A tokenizer source: a built-in model, a hub id or storage URI, or a local folder with tokenizer files."""
    if name in BUILTIN_MODELS or is_uri(name):
        return
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not any((path / file).is_file() for file in TOKENIZER_FILES):
            raise ConfigError(f"{key}: {name!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); point it at the "
                              "model directory the tokenizer was saved in")
        return
    if path.exists():
        raise ConfigError(f"{key}: {name!r} is a file; point it at the model directory the tokenizer was saved in")
    if not looks_like_hub_id(name):
        raise ConfigError(f"{key}: {name!r} does not exist. Allowed: a local model directory, a hub id such as "
                          f"org/model, or one of {', '.join(BUILTIN_MODELS)}")


def check_stored_model(uri: str, key: str, *, adapter_ok: bool = False) -> None:
    """A model (or adapter) folder in storage, checked by listing it and reading its config.json: the weights
    are not downloaded on the driver."""
    from raytune_it.storage import open_location, redact_uri

    try:
        folder = open_location(uri, key)
        files = folder.files()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot list {redact_uri(uri)}: {storage_cause(exc)}") from None
    if not files:
        raise ConfigError(f"{key}: {redact_uri(uri)} does not exist or is empty")
    problem = model_folder_problem(files, lambda file: (folder / file).read_bytes(), adapter_ok=adapter_ok)
    if problem:
        raise ConfigError(f"{key}: {redact_uri(uri)} {problem}")


#: A data file's type by its suffix: the one home of this rule (``data.records.file_type_by_name`` reads it). A
#: folder's shards must all have one type; a ``.json`` file's content decides whether it is an array or lines.
SUFFIX_TYPES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def data_files(name: str, key: str = "data.path") -> list[str]:
    """The files a data path names, in the order their records are read: the file itself, or every data
    file directly in a folder (local or a storage prefix), sorted by name, as Ray Data and Hugging Face
    datasets read a folder of shards. The one rule for what a data path holds: the config checks, the
    readers, the dataset fingerprint and the Ray Data chunks all use it."""
    if name in BUILTIN_DATA:
        return [name]
    if name.startswith("builtin:"):
        raise ConfigError(f"{key}: unknown built-in dataset {name!r}; built-ins: {', '.join(BUILTIN_DATA)}")
    if is_uri(name):
        from raytune_it.storage import open_location, redact_uri

        try:
            location = open_location(name, key)
            if location.is_file():
                return [name]
            names = location.listdir()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {redact_uri(name)}: {storage_cause(exc)}") from None
        if not names:
            raise ConfigError(f"{key}: {redact_uri(name)} does not exist in storage. Pass a {RECORDS_FILE}, a "
                              f"folder of them, or {BUILTIN_DATA[0]}")
        return [(location / shard).uri for shard in _shards(names, redact_uri(name), key)]
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return [str(path / shard) for shard in _shards([p.name for p in path.iterdir() if p.is_file()], name, key)]
    if not path.is_file():
        raise ConfigError(f"{key}: {name!r} does not exist. Pass a {RECORDS_FILE}, a folder of them, or "
                          f"{BUILTIN_DATA[0]}")
    return [name]


def _shards(names: list[str], folder: str, key: str) -> list[str]:
    shards = sorted(n for n in names if Path(n).suffix.lower() in SUFFIX_TYPES and not n.startswith((".", "_")))
    if not shards:
        raise ConfigError(f"{key}: the folder {folder} holds no {', '.join(sorted(SUFFIX_TYPES))} file; pass a "
                          f"{RECORDS_FILE} or a folder of them")
    types = {SUFFIX_TYPES[Path(n).suffix.lower()] for n in shards}
    if len(types) > 1:
        raise ConfigError(f"{key}: the folder {folder} mixes file types ({', '.join(sorted(types))}); its shards "
                          "must be all JSON Lines, all JSON or all Parquet")
    return shards


def check_data_path(name: str, key: str = "data.path") -> None:
    data_files(name, key)


def path_settings(config: JobConfig) -> list[tuple[str, str, str]]:
    """(key, value, kind) of every setting that names a model ('model', 'model or adapter') or data ('data'):
    the one list of what :func:`check_paths` checks."""
    settings = [("model.name_or_path", config.model.name_or_path, "model"), ("data.path", config.data.path, "data")]
    if config.data.eval_path is not None:
        settings.append(("data.eval_path", config.data.eval_path, "data"))
    settings += [(f"eval.models.{name}", path, "model or adapter") for name, path in config.eval.models.items()]
    settings.append(("eval.data.path", config.eval.data.path, "data"))
    settings += [(f"generate.models.{name}", path, "model or adapter") for name, path in config.generate.models.items()]
    return settings


def check_paths(config: JobConfig, already_checked: set[tuple[str, str, str]] | None = None) -> None:
    """Every model and data path the config names exists and can load; ``already_checked`` (a sweep's, over its
    trials) skips settings checked before, and gains the ones checked now."""
    for setting in path_settings(config):
        if already_checked is not None and setting in already_checked:
            continue
        key, value, kind = setting
        if kind == "data":
            check_data_path(value, key)
        else:
            check_model_path(value, key, adapter_ok=kind == "model or adapter")
        if already_checked is not None:
            already_checked.add(setting)
