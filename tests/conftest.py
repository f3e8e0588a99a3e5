import importlib
import os
from pathlib import Path

import pytest
import torch

# CI has two CPU cores; multi-process jobs run in subprocesses with one thread each (tests/helpers/jobs.py).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder, so default log dirs (lightning_logs, runs) never collide."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def in_process_group():
    """A 1-process fit under FSDP sets up a process group and rendezvous variables (MASTER_PORT ...): remove them."""
    environment = set(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for variable in set(os.environ) - environment:
        del os.environ[variable]


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script by name (the scripts import their sibling ``common``): ``bench("mup_transfer")``."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    return importlib.import_module


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
