"""A randomly initialised LLaMA of a chosen size, with the tiny model's tokenizer, saved as a
Hugging Face model directory (safetensors): a stand-in for a real checkpoint where no hub is
reachable, so that benchmarks on a GPU can time a model whose kernels are not all launch
overhead. Its outputs are noise; its shapes and its cost per token are a LLaMA's.

    python bench/random_llama.py OUT_DIR [--hidden 2048] [--layers 16] [--intermediate 5504] [--heads 16]

The defaults give about 0.85B parameters (LLaMA-7B's shape at a quarter of the width and half
the depth). Built on the GPU when there is one, in bf16.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where to write the model directory")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers")
    parser.add_argument("--intermediate", type=int, default=5504, help="MLP width")
    parser.add_argument("--heads", type=int, default=16, help="attention heads")
    args = parser.parse_args()

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from raytune_it.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.out_dir)
    print(f"{args.out_dir}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main()
