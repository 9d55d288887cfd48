"""The README is run, not just read: its Python API snippet executes as written (fresh interpreter,
bundled models), and the import-order advice it gives holds (its test command: tests/test_ci.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _env_without_wait_policy() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, where the advice matters
    return env


def _run_snippet(snippet: str, tmp_path: Path) -> str:
    """Run a README code block as a script (UserWarnings are errors); its stdout."""
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", str(script)],
        cwd=tmp_path, env=_env_without_wait_policy(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_python_api_snippet_runs_as_written(tmp_path: Path) -> None:
    (snippet,) = _code_blocks(_section("Python API"), "python")
    assert "torch.Size([4, 1, 28, 28])" in _run_snippet(snippet, tmp_path)


def test_editing_snippet_runs_as_written(tmp_path: Path) -> None:
    (snippet,) = _code_blocks(_section("Editing: inpainting and SDEdit"), "python")
    assert "torch.Size([4, 1, 28, 28]) torch.Size([4, 1, 28, 28])" in _run_snippet(
        snippet, tmp_path
    )


def _import_order(first: str, second: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", f"import {first}\nimport {second}\n"],
        env={**_env_without_wait_policy(), **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def test_importing_torch_first_is_reported_with_the_fix() -> None:
    err = _import_order("torch", "adm")
    assert "PerformanceWarning" in err and "import adm before torch" in err
    assert "OMP_WAIT_POLICY=PASSIVE" in err
    assert "PerformanceWarning" not in _import_order("adm", "torch")
    assert "PerformanceWarning" not in _import_order("torch", "adm", OMP_WAIT_POLICY="ACTIVE")


def test_adm_sets_the_wait_policy_before_torch_loads_openmp() -> None:
    code = "import adm, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env_without_wait_policy(), capture_output=True,
        text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "PASSIVE"
