"""The built-in ``tiny-llama``: a few-million-parameter LLaMA built on this machine.

No hub is reachable here, so the default base model is made locally: a byte-level
BPE tokenizer trained with ``tokenizers`` on the generated task data, and a
randomly initialised ``LlamaForCausalLM``. It is saved once, with safetensors, as
an ordinary Hugging Face model directory, and every stage then loads it by path
exactly as it would a real 7B checkpoint. Building is deterministic: the same
version gives the same tokenizer and weights.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from raytune_it.builtins import TINY_MODEL_NAMES
from raytune_it.cache import cache_dir

TINY_NAME = "tiny-llama"
TINY_VERSION = 1
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
ARCHITECTURE = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
)


def tiny_model_dir(name: str = TINY_NAME) -> Path:
    version = TINY_VERSION if name == TINY_NAME else TINY_FAMILIES[name].version
    return cache_dir() / "models" / f"{name}-v{version}"


def _training_text() -> list[str]:
    from raytune_it.data.synthetic import generate
    from raytune_it.data.templates import render_prompt

    texts = []
    for record in generate(4000, seed=1234):
        texts.append(render_prompt(record) + record["output"])
    return texts


def build_tokenizer(style: str = "byte-level", vocab_size: int = VOCAB_SIZE):
    """A BPE tokenizer trained on the generated task data, in one of the two styles LLaMA models use.

    ``byte-level`` is a GPT-2-style byte-level BPE, as LLaMA 3 has (and ``tiny-llama``); ``sentencepiece``
    is a SentencePiece-style BPE with a ``▁`` word prefix (``Metaspace``, prepended to the first word
    only), newlines as pieces of their own, and byte fallback, as LLaMA 1 and 2 have. Both prepend BOS when
    encoding with special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    if style == "byte-level":
        core = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        core.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos])
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "sentencepiece":
        core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        # Newlines stay pieces of their own, as LLaMA's byte-fallback <0x0A> is.
        core.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)])
        core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
        core.post_processor = bos
        alphabet = [f"<0x{byte:02X}>" for byte in range(256)]
    else:
        raise ValueError(f"unknown tokenizer style {style!r}: byte-level or sentencepiece")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + (
        alphabet if style == "sentencepiece" else []), initial_alphabet=[] if style == "sentencepiece" else alphabet,
        show_progress=False)
    core.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=ARCHITECTURE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


@dataclass(frozen=True)
class TinyFamily:
    """A locally built tiny random model in the shape of a real family: its architecture, attention
    (``kv_heads`` below the 8 heads is grouped-query attention), vocabulary, tokenizer style and chat template."""

    architecture: str  # "llama", "qwen2" or "mistral"
    tokenizer: str  # a build_tokenizer style
    vocab_size: int = VOCAB_SIZE
    kv_heads: int = 8
    chat_template: str | None = None  # a raytune_it.data.chat.CHAT_TEMPLATES name
    version: int = 1


#: The built-in models, by name: ``tiny-llama`` (LLaMA 1/2-shaped, the default) and today's families.
TINY_FAMILIES = {
    TINY_NAME: TinyFamily("llama", "byte-level"),
    # LLaMA 3: grouped-query attention, a vocabulary larger than the tokenizer needs, the Llama 3 chat format.
    "tiny-llama3": TinyFamily("llama", "byte-level", vocab_size=4096, kv_heads=2, chat_template="llama-3"),
    # Qwen2: grouped-query attention with biased q/k/v projections, ChatML.
    "tiny-qwen2": TinyFamily("qwen2", "byte-level", vocab_size=4096, kv_heads=2, chat_template="chatml"),
    # Mistral: grouped-query attention, sliding-window attention, a SentencePiece-style tokenizer.
    "tiny-mistral": TinyFamily("mistral", "sentencepiece", kv_heads=2, chat_template="llama-2"),
}


if tuple(TINY_FAMILIES) != TINY_MODEL_NAMES:
    raise RuntimeError(f"raytune_it.builtins and models.tiny disagree: {tuple(TINY_FAMILIES)} {TINY_MODEL_NAMES}")


def _config_class(architecture: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[architecture]


def build_tiny_model(target: Path, name: str = TINY_NAME) -> Path:
    """Build a tiny family's tokenizer and random model and save them to ``target`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = TINY_FAMILIES[name]
    tokenizer = build_tokenizer(family.tokenizer)
    if family.chat_template is not None:
        from raytune_it.data.chat import CHAT_TEMPLATES

        tokenizer.chat_template = CHAT_TEMPLATES[family.chat_template]
    extra = {} if family.architecture != "mistral" else {"sliding_window": 256}
    config = _config_class(family.architecture)(
        vocab_size=max(len(tokenizer), family.vocab_size if name != TINY_NAME else 0),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dict(ARCHITECTURE, num_key_value_heads=family.kv_heads), **extra,
    )
    torch.manual_seed(TINY_VERSION)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_model(name: str = TINY_NAME) -> Path:
    """A built-in model's directory, built on first use; safe when several processes race."""
    from filelock import FileLock

    target = tiny_model_dir(name)
    if (target / "config.json").is_file():
        return target
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            build_tiny_model(target, name)
    return target
