from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/toys.py

from toys import register_toys  # noqa: E402

os.environ.setdefault("LLMSLIM_PROGRESS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))
register_toys()

from llmslim.testing import register_profiles  # noqa: E402

# "ci" (the default): bounded examples, no deadline; HYPOTHESIS_PROFILE=thorough for long runs.
register_profiles(load=os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (real models)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run the test with one torch thread: tiny models run faster so, and do not fight other
    processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
