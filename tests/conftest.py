"""Shared pytest fixtures: where the golden reference values live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Test modules import torch before adm (isort order): give OpenMP adm's wait policy before torch
# loads it, as `import adm` first would (README, "Python API").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """`$ADM_GOLDEN_DIR`, else `../shared/golden` next to the repository, else next to the local
    repository this one was cloned from (a throw-away clone, e.g. in a temporary folder)."""
    if "ADM_GOLDEN_DIR" in os.environ:
        return Path(os.environ["ADM_GOLDEN_DIR"])
    beside = REPO_ROOT.parent / "shared" / "golden"
    origin = None if beside.is_dir() else _local_origin()
    cloned_from = origin.parent / "shared" / "golden" if origin is not None else None
    return cloned_from if cloned_from is not None and cloned_from.is_dir() else beside


def _local_origin() -> Path | None:
    """The folder of the `origin` remote when it is a path on this machine."""
    import subprocess

    try:
        url = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "remote", "get-url", "origin"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(url.removeprefix("file://"))
    return path.resolve() if path.is_dir() else None


@pytest.fixture(scope="session")
def golden_root() -> Path:
    root = golden_dir()
    if not root.is_dir():
        pytest.fail(f"golden folder {root} not found: set ADM_GOLDEN_DIR to ../shared/golden")
    return root


# ---- helpers shared by the network tests (plain functions, imported with `from conftest import`)


def golden_cases(*kinds: str, default: tuple[str, ...]) -> list[str]:
    """Every golden case of these kinds (else the known names, so a missing folder fails)."""
    import json

    root = golden_dir()
    found = []
    if root.is_dir():
        for path in sorted(root.glob("*.json")):
            if json.loads(path.read_text()).get("kind") in kinds:
                found.append(path.stem)
    return found or list(default)


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
