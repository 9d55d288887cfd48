"""One process per run folder (`adm._util.lock`): a second process is refused with one line that
names the holder, the lock dies with its holder (even SIGKILLed), stale temporary files of
interrupted writes are removed, and a refused command leaves no folder behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from adm._util.lock import LOCK_NAME, FolderBusyError, run_folder_lock
from adm.cli import main as cli

HOLD = textwrap.dedent(
    """
    import sys, time
    from adm._util.lock import run_folder_lock
    with run_folder_lock(sys.argv[1], "adm sample --out x"):
        print("locked", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of tmp_path/run (killed at the end)."""
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_second_process_is_refused_naming_the_holder(holder):
    folder, proc = holder
    match = f"in use by another process \\(pid {proc.pid}: adm sample --out x\\); wait for it"
    with pytest.raises(FolderBusyError, match=match), run_folder_lock(folder, "adm sample"):
        pass


def test_the_lock_dies_with_a_killed_holder(holder):
    folder, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with run_folder_lock(folder, "adm train") as locked:  # no stale lock to break by hand
        assert (locked / LOCK_NAME).read_text() == f"pid {os.getpid()}: adm train\n"


def test_stale_temporary_files_are_removed_and_results_kept(tmp_path):
    (tmp_path / "batches").mkdir()
    stale = [tmp_path / ".run.json.k2j3.tmp", tmp_path / "batches" / ".batch_000001.npz.x.tmp"]
    kept = [tmp_path / "run.json", tmp_path / "batches" / "batch_000000.npz", tmp_path / "a.tmp"]
    for path in stale + kept:
        path.write_text("x")
    with run_folder_lock(tmp_path, "adm sample"):
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_folder_made_only_for_the_lock_is_removed(tmp_path):
    with run_folder_lock(tmp_path / "new", "adm sample"):
        assert (tmp_path / "new" / LOCK_NAME).exists()
    assert not (tmp_path / "new").exists()
    with run_folder_lock(tmp_path / "used", "adm sample") as folder:
        (folder / "run.json").write_text("{}")
    assert (tmp_path / "used" / "run.json").exists()


@pytest.mark.parametrize("command", ["sample", "train"])
def test_cli_refuses_a_busy_run_folder_in_one_line(holder, capsys, command):
    folder, proc = holder
    argv = {
        "sample": ["sample", "--checkpoint", "fmnist_diffusion", "--num-samples", "2"],
        "train": ["train", "--preset", "tiny_diffusion", "--data", "x", "--steps", "1"],
    }
    assert cli.main([*argv[command], "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"adm {command}: error: run folder {folder} is in use by another process "
                   f"(pid {proc.pid}: adm sample --out x); wait for it to finish or choose "
                   "another --out")  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing written


def test_cli_bad_option_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "never"
    argv = ["sample", "--checkpoint", "fmnist_diffusion", "--num-samples", "0", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "--num-samples" in capsys.readouterr().err and not out.exists()


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """Disk full in the middle of rewriting run.json (or a report, a PNG): the old file stays
    whole, no 0-byte file and no temporary is left (the ENOSPC of issue 16)."""
    import errno
    from pathlib import Path

    from adm._util.atomic import atomic_write_text

    target = tmp_path / "run.json"
    target.write_text('{"seed": 5}\n')
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        real(self, text[:3])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, '{"seed": 6}\n')
    monkeypatch.undo()
    assert target.read_text() == '{"seed": 5}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
