"""Shared fixtures: the embedded model's tokenizer (loaded once per test session)."""

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from backend.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None))
