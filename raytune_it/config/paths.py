"""Checks that the paths a config names exist, done on the driver before launch.

A hub id (``meta-llama/Llama-2-7b-hf``) is accepted without a local directory;
anything that looks like a filesystem path must exist.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from raytune_it.config.schema import JobConfig
from raytune_it.errors import ConfigError

BUILTIN_MODELS = ("tiny-llama",)
BUILTIN_DATA = ("builtin:tasks",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def check_model_path(name: str, key: str = "model.name_or_path") -> None:
    if name in BUILTIN_MODELS:
        return
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {name!r} is a directory without config.json; "
                              "point it at a Hugging Face model directory (config.json, *.safetensors, tokenizer)")
        return
    if path.exists():
        raise ConfigError(f"{key}: {name!r} is a file; point it at a Hugging Face model directory")
    if looks_like_hub_id(name):
        return
    raise ConfigError(f"{key}: {name!r} does not exist. Allowed: a local Hugging Face model directory, "
                      f"a hub id such as org/model, or one of {', '.join(BUILTIN_MODELS)}")


def check_data_path(name: str, key: str = "data.path") -> None:
    if name in BUILTIN_DATA:
        return
    if name.startswith("builtin:"):
        raise ConfigError(f"{key}: unknown built-in dataset {name!r}; built-ins: {', '.join(BUILTIN_DATA)}")
    if not Path(os.path.expanduser(name)).is_file():
        raise ConfigError(f"{key}: {name!r} does not exist. Pass a .json, .jsonl or .parquet file of Alpaca records, "
                          f"or {BUILTIN_DATA[0]}")


def check_paths(config: JobConfig) -> None:
    check_model_path(config.model.name_or_path)
    check_data_path(config.data.path)
