"""Loading a base model and tokenizer by name or path, as every stage does.

``tiny-llama`` resolves to the locally built directory; a storage URI
(``s3://bucket/models/llama-7b``) to a checked copy in this node's cache
(``raytune_it.storage.fetch_dir``); anything else goes to transformers as a local
directory or hub id. Weights load from safetensors only
(``use_safetensors=True``): a pickled ``.bin`` is never unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from raytune_it.errors import UserError
from raytune_it.models.tiny import TINY_FAMILIES, ensure_tiny_model

Precision = Literal["float32", "bfloat16", "float16"]


def resolve_model_path(name_or_path: str, key: str = "model.name_or_path", *, weights: bool = True) -> str:
    """A path or hub id transformers can load; builds the tiny model, or fetches a URI, if asked for it.

    ``weights=False`` is for what needs only the config and tokenizer: a URI's weights are not fetched.
    """
    from raytune_it.storage import fetch_dir, is_uri, open_location

    if name_or_path in TINY_FAMILIES:
        return str(ensure_tiny_model(name_or_path))
    if is_uri(name_or_path):
        return str(fetch_dir(open_location(name_or_path, key), key, weights=weights))
    path = Path(name_or_path).expanduser()
    return str(path) if path.exists() else name_or_path


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_path(name_or_path, weights=False), revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:  # no such hub repo or no hub; files transformers cannot read
        raise UserError(f"{name_or_path}: cannot load its tokenizer: {str(exc).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        # LLaMA tokenizers ship without a pad token; padding is masked out of the loss anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    *,
    precision: Precision = "float32",
    int8: bool = False,
    quantization: str = "none",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: Any = None,
) -> Any:
    """Load a causal LM; ``quantization`` (or ``int8``) quantizes the linear layers with bitsandbytes:
    ``int8`` is LLM.int8(), ``nf4`` 4-bit NormalFloat with double quantization and matmuls in ``precision``,
    as QLoRA trains."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    quantization = "int8" if int8 else quantization
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True) if quantization == "int8" else \
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=getattr(torch, precision))
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        dtype=getattr(torch, precision),
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        device_map=device_map,
        **kwargs,
    )
