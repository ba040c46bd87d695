"""What a model is made of, read without its weights: the one home of that knowledge.

- ``ModelShape``: a LLaMA-family model's shape, from its ``config.json``, the one derivation of its linear
  modules' sizes. The planner counts parameters and LoRA's trainable ones from it, and serving checks an
  adapter's matrices against it, so both honour ``head_dim`` (a model whose heads are not hidden/heads
  wide, as some of today's are) and grouped-query attention the same way. It needs no transformers, so the
  planner runs on a preset's numbers alone.
- ``meta_model``: any architecture built on the meta device, for what only its code knows (its class and
  module names); preflight checks ``lora.target_modules`` and the loss against it before Ray starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    #: Width of one attention head; None: hidden // heads.
    head_dim: int | None = None

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each LLaMA-family linear module of a layer, by name."""
        attention, kv = self.heads * self.attention_head_dim, self.kv_heads * self.attention_head_dim
        return {"q_proj": (self.hidden, attention), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (attention, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    @property
    def linear_params_per_layer(self) -> int:
        return sum(inputs * outputs for inputs, outputs in self.module_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        return self.layers * (self.linear_params_per_layer + 2 * self.hidden) + self.embedding_params + self.hidden


def meta_model(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model built on the meta device: its class and module names, with no weights read, even for 65B."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raytune_it.models.loading import resolve_model_path

    model_config = AutoConfig.from_pretrained(resolve_model_path(name_or_path, weights=False), revision=revision,
                                              trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def shape_from_hf_dict(data: Mapping[str, Any], name: str) -> ModelShape:
    """The shape a Hugging Face ``config.json`` (as a mapping) describes."""
    heads = data["num_attention_heads"]
    return ModelShape(
        name=name, layers=data.get("num_hidden_layers", 0), hidden=data["hidden_size"],
        intermediate=data.get("intermediate_size", 0), heads=heads,
        kv_heads=data.get("num_key_value_heads") or heads, vocab=data.get("vocab_size", 0),
        tied_embeddings=bool(data.get("tie_word_embeddings", False)), head_dim=data.get("head_dim") or None,
    )


def shape_from_hf_config(path: str | Path, name: str | None = None) -> ModelShape:
    """The shape of a model folder, from its ``config.json``."""
    return shape_from_hf_dict(json.loads((Path(path) / "config.json").read_text()), name or Path(path).name)
