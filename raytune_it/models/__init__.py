"""Base models: loading by name or path (bf16 / INT8), and the locally built tiny-llama."""
