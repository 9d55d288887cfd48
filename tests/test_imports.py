"""Import direction (conventions.md): model code never imports diffusion, sampling or training;
nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "adm"
MODEL_MODULES = ("nn", "unet", "classifier")
FORBIDDEN_FOR_MODELS = {"diffusion", "sampling", "schedule", "guidance", "train", "cli"}


def _adm_imports(path: Path) -> set[str]:
    """Names of the adm modules that `path` imports (absolute `adm.x` or relative `.x`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "adm" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0 and parts[:1] == ["adm"]:
                rest = parts[1:]
            elif node.level == 1:
                rest = parts
            else:
                continue
            if rest:
                found.add(rest[0])
            else:  # `from adm import x` / `from . import x`
                found.update(alias.name for alias in node.names)
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def test_model_modules_exist() -> None:
    names = {path.stem for path in _modules()}
    assert set(MODEL_MODULES) <= names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.stem)
def test_import_direction(path: Path) -> None:
    imports = _adm_imports(path)
    if path.stem != "cli":
        assert "cli" not in imports, f"{path.name} imports adm.cli"
    if path.stem in MODEL_MODULES:
        bad = imports & FORBIDDEN_FOR_MODELS
        assert not bad, f"model module {path.name} imports {sorted(bad)}"


def test_model_modules_import_only_downstream() -> None:
    # nn -> unet -> classifier: no module imports one further along the chain.
    for earlier, later in [("nn", "unet"), ("nn", "classifier"), ("unet", "classifier")]:
        assert later not in _adm_imports(PACKAGE / f"{earlier}.py")


def test_parser_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import adm.cli\nfrom adm import diffusion\nfrom .sampling import x\nfrom adm.nn import y\n"
        "import torch\nfrom .. import far\n"
    )
    assert _adm_imports(source) == {"cli", "diffusion", "sampling", "nn"}
