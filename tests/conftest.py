import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_and_private_cache(tmp_path_factory):
    """Deterministic, uncontended tests that never touch the user's cache."""
    torch.set_num_threads(1)
    cache = os.environ.get("PERTOKEN_TEST_CACHE") or str(tmp_path_factory.mktemp("pertoken-cache"))
    old = os.environ.get("PERTOKEN_CACHE")
    os.environ["PERTOKEN_CACHE"] = cache
    yield
    if old is None:
        os.environ.pop("PERTOKEN_CACHE", None)
    else:
        os.environ["PERTOKEN_CACHE"] = old


@pytest.fixture(scope="session")
def tiny():
    """A random-init tiny Llama and its byte-level tokenizer."""
    from pertoken.models import tiny_llama

    return tiny_llama(seed=0)
