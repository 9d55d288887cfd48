"""`adm --help`, `adm --version` and `adm CMD --help` answer without importing torch or numpy
(the commands import them when they run), and `adm` alone shows the help with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter: this test process has imported torch long ago.
_PROBE = """
import contextlib, io, json, sys
from adm.cli.main import _build_parser, main

commands = list(_build_parser()._subparsers._group_actions[0].choices)
found = {}
for argv in [["--help"], ["--version"], *[[c, "--help"] for c in commands]]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code == 0, (argv, exit.code)
    assert "usage: adm" in out.getvalue() or "adm " in out.getvalue(), argv
    found[" ".join(argv)] = [m for m in ("torch", "numpy") if m in sys.modules]
print(json.dumps({"commands": commands, "heavy": found}))
"""


def test_help_and_version_import_neither_torch_nor_numpy() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"sample", "train", "eval", "demo", "info"} <= set(report["commands"])
    assert len(report["heavy"]) == len(report["commands"]) + 2
    assert report["heavy"] == {argv: [] for argv in report["heavy"]}


def test_no_command_prints_the_help_and_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adm"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "usage: adm" in result.stderr and "sample" in result.stderr


@pytest.mark.parametrize("buffered", [True, False])
def test_a_closed_pipe_ends_quietly(buffered: bool) -> None:
    """`adm presets | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "adm", "presets"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    proc.stdout.close()  # the reader is gone before adm writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
