"""Shared pytest fixtures: where the golden reference values live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Test modules import torch before adm (isort order): give OpenMP adm's wait policy before torch
# loads it, as `import adm` first would (README, "Python API").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_ENV = "ADM_GOLDEN_DIR"


def golden_dir() -> Path:
    """The golden cases: `$ADM_GOLDEN_DIR` when set (another case set of the same kinds), else the
    repository's own copy in `tests/golden`."""
    override = os.environ.get(GOLDEN_ENV)
    return Path(override) if override else REPO_ROOT / "tests" / "golden"


def golden_problem(root: Path | None = None, pattern: str = "*.json") -> str | None:
    """Why a golden folder cannot be used (missing, or holding no file matching `pattern`), else
    None. A missing case set is a failure, never a skip: the message names the folder and the
    variable that chose it."""
    root = golden_dir() if root is None else root
    if not root.is_dir():
        problem = f"golden cases not found: {root} is not a folder"
    elif not any(root.glob(pattern)):
        problem = f"golden cases not found: {root} holds no {pattern}"
    else:
        return None
    if os.environ.get(GOLDEN_ENV):
        chosen = f"{GOLDEN_ENV}={os.environ[GOLDEN_ENV]}"
        return f"{problem} (chosen by {chosen}; unset it for the repository's tests/golden)"
    return f"{problem} (the repository's copy; restore it, or set {GOLDEN_ENV} to a case folder)"


@pytest.fixture(scope="session")
def golden_root() -> Path:
    problem = golden_problem()
    if problem is not None:
        pytest.fail(problem)
    return golden_dir()


# ---- helpers shared by the network tests (plain functions, imported with `from conftest import`)


def golden_cases(*kinds: str) -> list:
    """Every golden case of these kinds, as test parameters. A missing or empty folder gives one
    parameter whose test then fails in the `golden_root` fixture (never zero tests or a skip)."""
    import json

    root = golden_dir()
    if golden_problem(root) is not None:
        return [pytest.param("missing", id="golden-cases-missing")]
    paths = sorted(root.glob("*.json"))
    return [p.stem for p in paths if json.loads(p.read_text()).get("kind") in kinds]


def load_case(root: Path, name: str):
    """(json description, {array name: tensor}) of a golden case."""
    import json

    import numpy as np
    import torch

    meta = json.loads((root / f"{name}.json").read_text())
    with np.load(root / f"{name}.npz") as npz:
        arrays = {key: torch.from_numpy(npz[key]) for key in npz.files}
    return meta, arrays


def check_array(actual, meta: dict, arrays: dict, name: str) -> None:
    """Compare with the fixture's array `name` at the json's tolerances."""
    import torch

    tol = meta["tolerances"][name]
    torch.testing.assert_close(actual, arrays[name], rtol=tol["rtol"], atol=tol["atol"])


def seeded_noise(*shape: int, seed: int = 0):
    """Seeded standard normal inputs (tests must not depend on the global RNG or test order)."""
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def randomize(model, seed: int = 0):
    """Overwrite every parameter with seeded N(0, 0.2²) values (fresh ADM nets output zero)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model
