"""Ray Serve: an OpenAI-compatible endpoint over an inference engine (transformers or vLLM)."""
