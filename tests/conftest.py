"""Shared fixtures. The built-in artefacts (tiny model, generated data) go to one
temporary cache per test session, so tests never touch the user's ~/.cache."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAYTUNE_IT_CACHE", tempfile.mkdtemp(prefix="raytune-it-test-cache-"))


@pytest.fixture(scope="session")
def tiny_model_dir():
    from raytune_it.models.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from raytune_it.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))
