"""Fixtures for the language-model tests: tiny random Llamas sharing a character-level ChatML tokenizer."""

from __future__ import annotations

import pytest
import torch
from lm_helpers import short_examples

from embodied_distill.lm.models import tiny_chat_tokenizer, tiny_llama
from embodied_distill.lm.tasks import Example


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_chat_tokenizer()


@pytest.fixture
def teacher(tokenizer):
    """A confident random teacher (init std 0.3: peaked next-token distributions)."""
    return tiny_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=1, init_std=0.3).requires_grad_(
        False
    )


@pytest.fixture
def student(tokenizer):
    return tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=2).train()


@pytest.fixture
def examples() -> list[Example]:
    return short_examples()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
