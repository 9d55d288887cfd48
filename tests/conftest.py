"""Shared pytest fixtures: where the golden reference values live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """`$ADM_GOLDEN_DIR`, else `../shared/golden` next to the repository."""
    return Path(os.environ.get("ADM_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_root() -> Path:
    root = golden_dir()
    if not root.is_dir():
        pytest.fail(f"golden folder {root} not found: set ADM_GOLDEN_DIR to ../shared/golden")
    return root
