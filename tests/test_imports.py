"""Import direction (conventions.md, the layout issue): the sub-packages form layers and every
import points down.

    cli -> generate / training / evaluation -> models -> nets / diffusion / data;  _util from all

A package imports only itself, `_util` and packages of a lower layer; packages of one layer never
import each other. Inside a package the modules import each other without cycles. Imports inside
functions and under `TYPE_CHECKING` count too: a cycle hidden behind either is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "adm"
LAYERS: dict[str, int] = {
    "_util": 0,
    "nets": 1, "diffusion": 1, "data": 1,
    "models": 2,
    "generate": 3, "training": 3, "evaluation": 3,
    "cli": 4,
}  # fmt: skip


def _adm_imports(path: Path, dotted: str | None = None) -> set[str]:
    """Dotted names that the module at `path` (named `dotted`, by default from its place in the
    tree) imports from adm: `from adm.models import presets` gives `adm.models.presets` (x is a
    module), `from adm.models.presets import Preset` gives `adm.models.presets`. Relative imports
    are resolved against the module's own package."""
    package = (dotted or _dotted(path)).split(".")[:-1]  # ["adm", "nets"] for adm.nets.unet
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "adm")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            else:
                module = node.module or ""
            if module.split(".")[0] != "adm":
                continue
            for alias in node.names:
                sub = PACKAGE.parent / Path(*module.split("."), alias.name)
                is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
                found.add(f"{module}.{alias.name}" if is_module else module)
    return found


def _package_of(dotted: str) -> str | None:
    """`adm.nets.unet` -> "nets"; `adm` or `adm.__main__` -> None (the top level)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_subpackage_has_a_layer_and_no_module_is_loose() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(LAYERS)
    loose = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py", "__main__.py"}
    assert not loose, f"modules outside the sub-packages: {sorted(loose)}"


def _wrong_way(dotted: str, imports: set[str]) -> list[str]:
    own = _package_of(dotted)
    wrong = []
    for target in sorted(imports):
        other = _package_of(target)
        if own is None or other is None or other == own or other == "_util":
            continue
        if LAYERS[other] >= LAYERS[own]:
            wrong.append(f"{dotted} (layer {LAYERS[own]}) imports {target} (layer {LAYERS[other]})")
    return wrong


@pytest.mark.parametrize("path", _modules(), ids=_dotted)
def test_imports_point_down(path: Path) -> None:
    assert not _wrong_way(_dotted(path), _adm_imports(path))


def test_top_level_imports_nothing_but_the_cli() -> None:
    """`adm/__init__` stays import-free (fast `adm --help`); `__main__` only starts the CLI."""
    assert _adm_imports(PACKAGE / "__init__.py") == set()
    assert _adm_imports(PACKAGE / "__main__.py") == {"adm.cli.main"}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_import_cycle_inside_a_package(package: str) -> None:
    modules = {_dotted(p): p for p in (PACKAGE / package).glob("*.py") if p.stem != "__init__"}
    graph = {m: {t for t in _adm_imports(p) if t in modules and t != m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            cycle = " -> ".join([*trail[trail.index(node) :], node])
            pytest.fail(f"import cycle in adm.{package}: {cycle}")
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*trail, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_parser_sees_relative_absolute_and_nested_imports(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "import adm.cli.main\nfrom adm.diffusion import gaussian\nfrom .unet import x\n"
        "from adm.nets.nn import y\nimport torch\nfrom .. import models\n"
        "def f():\n    from adm.training import loop\n"
    )
    assert _adm_imports(source, "adm.nets.probe") == {
        "adm.cli.main", "adm.diffusion.gaussian", "adm.nets.unet", "adm.nets.nn",
        "adm.models", "adm.training.loop",
    }  # fmt: skip


def test_wrong_way_and_sideways_imports_are_caught() -> None:
    assert _wrong_way("adm.nets.unet", {"adm.models.presets"})  # up
    assert _wrong_way("adm.nets.unet", {"adm.diffusion.gaussian"})  # sideways, same layer
    assert _wrong_way("adm.training.loop", {"adm.evaluation.metrics"})
    assert not _wrong_way("adm.cli.demo", {"adm.training.state", "adm._util.atomic", "adm.cli"})


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_each_package_init_names_every_module(package: str) -> None:
    """The `__init__` docstring lists every module of its package (`name`: what it offers)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    modules = sorted(p.stem for p in (PACKAGE / package).glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if f"`{m}`:" not in doc]
    assert not missing, f"adm.{package}.__init__ does not describe {missing}"
