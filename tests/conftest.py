"""Shared test setup: two cores on CI, so keep every test single-threaded and quiet."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.text",
    "tests.fixtures.s3",
    "tests.fixtures.reliability",
    "pytester",
]


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # a schemas-only environment still runs the schemas tests
        return
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
