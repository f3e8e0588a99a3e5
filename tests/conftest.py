import os

import pytest
import torch

# CI has two CPU cores; multi-process jobs run in subprocesses with one thread each (tests/helpers/jobs.py).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder, so default log dirs (lightning_logs, runs) never collide."""
    monkeypatch.chdir(tmp_path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
