"""Fixtures for the tokenizer tests: the built-in byte tokenizer and tiny HF directories
built offline by tests.support.tokenizer (session-scoped: built once, ~10 ms each)."""

from __future__ import annotations

import pytest

from esp_core.tokenizer import load_tokenizer
from tests.support.tokenizer import build_hf_tokenizer_dir


@pytest.fixture(scope="session")
def byte_tok():
    return load_tokenizer("builtin")


@pytest.fixture(scope="session")
def bl_dir(tmp_path_factory):
    return build_hf_tokenizer_dir(tmp_path_factory.mktemp("byte_level"), "byte_level")


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory):
    return build_hf_tokenizer_dir(tmp_path_factory.mktemp("sentencepiece"), "sentencepiece")


@pytest.fixture(scope="session")
def bl_tok(bl_dir):
    return load_tokenizer(bl_dir)


@pytest.fixture(scope="session")
def sp_tok(sp_dir):
    return load_tokenizer(sp_dir)
