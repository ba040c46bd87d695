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
from pathlib import Path

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


def tiny_model_dir() -> Path:
    return cache_dir() / "models" / f"{TINY_NAME}-v{TINY_VERSION}"


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
    only), newlines as pieces of their own, and byte fallback, as LLaMA 1 and 2 have. Both prepend BOS when encoding with special tokens.
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


def build_tiny_model(target: Path) -> Path:
    """Build tokenizer and model and save them to ``target`` (atomically)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCHITECTURE,
    )
    torch.manual_seed(TINY_VERSION)
    model = LlamaForCausalLM(config)
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


def ensure_tiny_model() -> Path:
    """The tiny model's directory, built on first use; safe when several processes race."""
    from filelock import FileLock

    target = tiny_model_dir()
    if (target / "config.json").is_file():
        return target
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            build_tiny_model(target)
    return target
