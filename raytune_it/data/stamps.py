"""Stamps: what identifies a data file's or a model folder's content without reading it (place, size and
modification time, an object store's LastModified), as ``make`` and Ray Data's own caches do. Prepared
datasets are keyed by them, and a re-run of ``generate`` compares them to know it is the same job."""

from __future__ import annotations

from typing import Any

from raytune_it.builtins import TINY_MODEL_NAMES
from raytune_it.config.paths import data_files, looks_like_hub_id
from raytune_it.errors import ConfigError
from raytune_it.storage import is_uri, open_location


def data_stamp(path: str, key: str) -> dict[str, Any] | list[dict[str, Any]]:
    """What identifies a data file's content without reading it: its place, size and modification time (an
    object store's LastModified), as ``make`` and Ray Data's own caches do; for a folder, each of its shards'
    (one added, removed or changed is other data)."""
    if path == "builtin:tasks":
        return {"path": path}
    try:
        files = data_files(path, key)
    except ConfigError:
        return {"path": path, "missing": True}  # reading it will say so, naming the key
    stamps = []
    for file in files:
        location = open_location(file, key)
        info = location.filesystem.get_file_info(location.path)
        stamps.append({"path": location.uri, "size": info.size, "mtime_ns": info.mtime_ns})
    return stamps[0] if len(files) == 1 and files[0] == path else stamps


def model_stamp(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """A model or adapter folder's files, each with its size and modification time: weights trained again
    in place are another model. A built-in model or a hub id (at its revision) is its name."""
    from pyarrow.fs import FileSelector, FileType

    if name_or_path in TINY_MODEL_NAMES or (looks_like_hub_id(name_or_path) and not is_uri(name_or_path)
                                            and not open_location(name_or_path).exists()):
        return {"name": name_or_path, "revision": revision}
    folder = open_location(name_or_path, "model")
    root = folder.path.rstrip("/") + "/"
    infos = folder.filesystem.get_file_info(FileSelector(folder.path, recursive=True, allow_not_found=True))
    return {"path": folder.uri, "files": {info.path[len(root):]: [info.size, info.mtime_ns]
                                          for info in sorted(infos, key=lambda i: i.path)
                                          if info.type == FileType.File}}
