"""Run training jobs in subprocesses, as users do: the console script, or a script Lightning relaunches per rank."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"


# Set by Lightning in the test process when an in-process test ran a distributed strategy; a job that inherited them
# would rendezvous on that test's port instead of choosing a free one.
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


def job_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in RENDEZVOUS_VARIABLES}
    env.update(
        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    )
    return env


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` to completion; fail the test with its output if it exits non-zero."""
    result = subprocess.run(command, cwd=cwd, env=job_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
            f"--- stderr\n{result.stderr[-8000:]}"
        )
    return result


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``lightning-power <args>`` in a fresh interpreter (Lightning relaunches it once per extra rank)."""
    return run([sys.executable, "-m", "lightning_power.cli", *args], cwd, timeout)


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Series from a CSVLogger ``metrics.csv``: name -> [(step, value), ...] for the rows that hold a value."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series
