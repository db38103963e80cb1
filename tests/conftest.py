from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
UF_TRAIN = SHARED_DATA / "ultrafeedback" / "train_1k.jsonl.gz"
HH_TEST = SHARED_DATA / "hh_rlhf" / "harmless_base_test.jsonl.gz"
ORCA = SHARED_DATA / "orca_dpo" / "validation_284.jsonl.gz"


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``perpair`` as a user would, in a fresh process."""
    result = subprocess.run([sys.executable, "-m", "perpair", *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    if check and result.returncode != 0:
        raise AssertionError(f"perpair {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def uf_pairs(tmp_path_factory) -> Path:
    """The UltraFeedback sample prepared once per test session."""
    path = tmp_path_factory.mktemp("uf") / "uf.parquet"
    run_cli("prepare", UF_TRAIN, "-o", path)
    return path
