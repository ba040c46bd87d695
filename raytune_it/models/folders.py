"""What a model or adapter folder must hold to load: one rule for local folders and storage, for the
driver's checks before Ray starts and the replicas' checks of adapters loaded on demand."""

from __future__ import annotations

import json
from typing import Callable, Collection

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter_problem(files: Collection[str]) -> str | None:
    """What keeps a folder from loading as a peft adapter, or None."""
    if ADAPTER_CONFIG not in files:
        return f"is not a peft adapter directory (no {ADAPTER_CONFIG})"
    if ADAPTER_WEIGHTS not in files:
        return (f"has no {ADAPTER_WEIGHTS}; only safetensors weights are loaded (a pickled "
                "adapter_model.bin is never unpickled)")
    return None


#: Files any one of which lets ``AutoTokenizer`` load a folder's tokenizer (fast, sentencepiece or BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def model_folder_problem(files: Collection[str], read: Callable[[str], bytes], *, adapter_ok: bool) -> str | None:
    """What keeps a folder from loading as a Hugging Face model (or, with ``adapter_ok``, a peft adapter), or
    None. The one rule for local folders and storage: caught here on the driver, not in a replica or a Ray
    Data actor after Ray has started."""
    if ADAPTER_CONFIG in files:
        if adapter_ok:
            return adapter_problem(files)
        if "config.json" not in files:
            return "is a peft adapter folder, not a model: name its base model here and the adapter where adapters go"
    wanted = "a Hugging Face model folder (config.json, *.safetensors, a tokenizer)" + (
        f" or a peft adapter folder ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS})" if adapter_ok else "")
    missing = [what for what, present in (
        ("config.json", "config.json" in files),
        ("*.safetensors weights (only safetensors are loaded)", any(n.endswith(".safetensors") for n in files)),
        (f"tokenizer files ({', '.join(TOKENIZER_FILES)})", any(n in files for n in TOKENIZER_FILES)),
    ) if not present]
    if missing:
        shown = ", ".join(sorted(files)[:8]) or "nothing"
        return f"is not {wanted}: it has no {' and no '.join(missing)} (it holds {shown})"
    try:
        config = json.loads(read("config.json"))
    except (OSError, ValueError, RecursionError):
        return "has a config.json that is not valid JSON"
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return "has a config.json without a model_type, so transformers cannot tell which model it is"
    return None
