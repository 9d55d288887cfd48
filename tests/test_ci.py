"""CI (`.ci/run`) runs exactly the README's test command, in a fresh clone placed alone in a
temporary folder (so the tests can only use what the repository holds)."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def test_ci_runs_the_readme_test_command_in_a_fresh_clone() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"exactly what CI runs, `\.ci/run`\):\s*```bash\n(.+?)\n```", readme, re.S)
    assert block is not None, "README lost its test command"
    lines = (REPO_ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert lines[-1] == block[1].strip()
    clone = ["work=$(mktemp -d)", "trap 'rm -rf \"$work\"' EXIT", 'git clone -q "$src" "$work/adm"']
    assert lines[-1 - len(clone) - 1 : -1] == [*clone, 'cd "$work/adm"']
