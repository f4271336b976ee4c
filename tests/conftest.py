"""Shared fixtures: tiny random-weight checkpoints of every family, loaded through explainprune.load."""

from __future__ import annotations

import functools

import pytest
import torch

import explainprune
import explainprune.models
from explainprune.testing import FAMILIES, build_tiny, random_image


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared, loaded machine; a test that changes
    the thread count (the demo, `train --threads`) does not leak it into the next one."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> checkpoint directory (built once per session, on first use)."""
    return functools.cache(lambda family: build_tiny(family, tmp_path_factory.mktemp(family)))


@pytest.fixture(scope="session")
def load_tiny(tiny_dirs):
    return functools.cache(lambda family: explainprune.load(tiny_dirs(family)))


@pytest.fixture(scope="session")
def deep_dirs(tmp_path_factory):
    """family -> checkpoint directory of a 4-layer tiny model (built once per session, on first use)."""
    return functools.cache(lambda family: build_tiny(family, tmp_path_factory.mktemp(f"{family}-deep"), layers=4))


@pytest.fixture(scope="session")
def deep(deep_dirs):
    """family -> (sdpa VLM, eager VLM) of a 4-layer tiny model (in-LLM pruners need K < layers)."""
    return functools.cache(lambda family: (explainprune.load(deep_dirs(family)),
                                           explainprune.load(deep_dirs(family), attn_implementation="eager")))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def vlm(load_tiny, family):
    return load_tiny(family)


@pytest.fixture
def image():
    return random_image(0)


@pytest.fixture
def frames():
    return [random_image(10 + i, (112, 112)) for i in range(4)]


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the error must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(explainprune, "load", refuse)
    monkeypatch.setattr(explainprune.models, "load", refuse)

