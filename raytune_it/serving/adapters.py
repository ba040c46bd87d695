"""Which adapters a deployment can serve, and the checks one must pass before an engine loads it.

Adapters come from two places: ``serve.adapters`` (name -> folder, checked on the driver before any
replica starts) and ``serve.adapter_root`` (a local folder or storage URI; every adapter under it is
servable by its folder name, found when first asked for). Under the root, ``<name>/`` may be a peft
adapter folder or a raytune-it run whose ``export/`` is one, so ``serve.adapter_root=runs`` serves every
LoRA run by its run name as soon as its export is published.

An adapter is loaded only if it is a peft LoRA folder with safetensors weights, its rank fits the engine,
and its weight shapes fit the served base model (a LoRA for another base is refused with the layer and
the shapes named, not left to fail inside the engine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raytune_it.config.schema import SAFE_NAME
from raytune_it.models.folders import ADAPTER_CONFIG as CONFIG
from raytune_it.models.folders import ADAPTER_WEIGHTS as WEIGHTS
from raytune_it.models.folders import adapter_problem
from raytune_it.models.shape import shape_from_hf_dict
from raytune_it.service.names import parse_fine_tuned
from raytune_it.serving.engines.base import EngineError
from raytune_it.storage import (
    Location,
    fetch_dir,
    is_published,
    is_uri,
    local,
    open_location,
    redact_uri,
    storage_cause,
)

ADAPTER_NAME = SAFE_NAME  # the names a config may give adapters: one rule for config and HTTP


def check_adapter_dir(name: str, path: str) -> None:
    """On the driver, before any replica starts: the adapter folder exists, locally or in storage
    (listed, not downloaded), and holds safetensors weights."""
    key = f"serve.adapters.{name}"
    if is_uri(path):
        try:
            files = set(open_location(path, key).files())
        except OSError as exc:
            raise ValueError(f"{key}: cannot list {path!r}: {storage_cause(exc)}") from None
    else:
        folder = Path(path).expanduser().resolve()
        files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    problem = adapter_problem(files)
    if problem:
        raise ValueError(f"{key}: {path!r} {problem}")


def check_adapter_root(root: str) -> None:
    """On the driver: the root is a folder that can be listed (it may be empty: adapters arrive later)."""
    key = "serve.adapter_root"
    if is_uri(root):
        try:
            open_location(root, key).listdir()
        except OSError as exc:
            raise ValueError(f"{key}: cannot list {redact_uri(root)}: {storage_cause(exc)}") from None
    elif not Path(root).expanduser().is_dir():
        raise ValueError(f"{key}: {root!r} is not a folder; create it, or point it at the folder (or storage URI) "
                         "the adapters are written to")


def _bad(name: str, problem: str) -> EngineError:
    return EngineError(f"adapter {name!r} {problem}", status=400, code="invalid_adapter", param="model")


def expected_lora_shapes(base_config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the LLaMA-family projections LoRA targets, from the base's config."""
    return shape_from_hf_dict(base_config, "base").module_shapes()


def lora_rank(config: dict) -> int:
    return max([int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def check_adapter(name: str, folder: Path, base_config: dict, max_rank: int | None) -> dict:
    """Read and check a local adapter folder against the served base; return its adapter_config."""
    from safetensors import safe_open

    problem = adapter_problem({p.name for p in folder.iterdir()} if folder.is_dir() else set())
    if problem:
        raise _bad(name, problem)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise _bad(name, f"has an unreadable {CONFIG}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise _bad(name, f"is not a LoRA adapter (peft_type {kind!r})")
    rank = lora_rank(config)
    if max_rank is not None and rank > max_rank:
        raise _bad(name, f"has rank {rank}, above this deployment's maximum LoRA rank {max_rank}; "
                         "redeploy with serve.max_lora_rank set at least that high")
    expected = expected_lora_shapes(base_config)
    layers = base_config.get("num_hidden_layers", 0)
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as weights:
            for key in weights.keys():
                parts = key.split(".")
                if "lora_A" not in parts and "lora_B" not in parts:
                    continue
                if "layers" in parts:
                    index = parts[parts.index("layers") + 1]
                    if index.isdigit() and int(index) >= layers:
                        raise _bad(name, f"does not fit the base model: it has weights for layer {index} and "
                                         f"the base has {layers} layers")
                module = next((p for p in reversed(parts) if p in expected), None)
                if module is None:
                    continue
                shape = tuple(weights.get_slice(key).get_shape())
                fan_in, fan_out = expected[module]
                fits = shape[1] == fan_in if "lora_A" in parts else shape[0] == fan_out
                if not fits:
                    raise _bad(name, f"does not fit the base model: {key} has shape {list(shape)}, and the "
                                     f"base's {module} takes {fan_in} inputs and gives {fan_out} outputs "
                                     "(an adapter trained on another base model?)")
    except EngineError:
        raise
    except Exception as exc:  # a truncated or foreign file: the client's adapter, not the server, is wrong
        raise _bad(name, f"has unreadable weights in {WEIGHTS}: {exc}") from None
    return config


class AdapterCatalog:
    """The configured adapters plus those under ``serve.adapter_root``: names, and local folders on demand."""

    def __init__(self, configured: dict[str, str], root: str | None, fine_tuned_root: str | None = None) -> None:
        self.configured, self.root = dict(configured), root
        # The fine-tuning service's runs: ft:...:<job id> is <fine_tuned_root>/<job id>/export. The ingress
        # has checked that the caller's organization owns it before a request is routed here.
        self.fine_tuned_root = fine_tuned_root

    def _root(self) -> Location | None:
        return open_location(self.root, "serve.adapter_root") if self.root else None

    def _under_root(self, name: str) -> Location | None:
        """The adapter folder for ``name`` under the root (``<name>/`` or ``<name>/export/``), or None."""
        root = self._root()
        if root is None:
            return None
        for folder in (root / name, root / name / "export"):
            if is_published(folder) or (folder / CONFIG).exists():  # what else it needs, the check names
                return folder
        return None

    def names(self) -> list[str]:
        """Configured adapters first, then the root's servable folders, sorted."""
        root = self._root()
        try:
            entries = sorted(root.listdir()) if root is not None and root.exists() else []
        except OSError:
            entries = []
        found = [e for e in entries if ADAPTER_NAME.match(e) and e not in self.configured
                 and self._under_root(e) is not None]
        return [*self.configured, *found]

    def knows(self, name: str) -> bool:
        """Cheap: could ``name`` be an adapter here (configured, or a valid name with a root to look in)?"""
        return name in self.configured or (self.root is not None and bool(ADAPTER_NAME.match(name)))

    def location(self, name: str) -> Location:
        """Where adapter ``name`` lives; EngineError 404 where it does not exist."""
        if name in self.configured:
            path = self.configured[name]
            return open_location(path, f"serve.adapters.{name}") if is_uri(path) else local(path)
        tuned = parse_fine_tuned(name) if self.fine_tuned_root else None
        if tuned is not None and self.fine_tuned_root:
            return open_location(self.fine_tuned_root, "run.storage") / tuned.job_id / "export"
        missing = EngineError(f"model {name!r} does not exist: neither a served model nor an adapter under "
                              "serve.adapter_root", status=404, code="model_not_found", param="model")
        if not self.knows(name):
            raise missing
        try:
            found = self._under_root(name)
        except OSError as exc:
            raise EngineError(f"adapter {name!r}: cannot read serve.adapter_root {redact_uri(self.root or '')}: "
                              f"{storage_cause(exc)}", status=503, code="storage_unavailable") from None
        if found is None:
            raise missing
        return found

    def local_folder(self, name: str) -> Path:
        """The adapter as a local folder on this node (a storage copy is fetched into the cache)."""
        location = self.location(name)
        if location.is_local:
            return Path(location.path)
        try:
            return fetch_dir(location, f"adapter {name!r}")
        except Exception as exc:
            raise _bad(name, f"could not be fetched: {exc}") from None

    def max_rank(self) -> int:
        """The highest rank among the adapters there are now (only their configs are read), at least 8."""
        ranks = [8]
        for name in self.names():
            try:
                ranks.append(lora_rank(json.loads((self.location(name) / CONFIG).read_text())))
            except (EngineError, OSError, ValueError, TypeError):
                continue  # a bad adapter is refused when asked for, not at start
        return max(ranks)


def read_base_config(base_path: str) -> dict[str, Any]:
    """The base model's config as a dict (a local folder, or a hub id's cached config)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path)
    return getattr(config, "text_config", config).to_dict()
