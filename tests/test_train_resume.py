"""Fault and distribution tests with real processes: a training run (LR annealed, dropout 0.1)
killed with SIGKILL, or stopped with SIGTERM, and rerun ends bitwise equal to an uninterrupted one
(CPU), and 2 gloo processes under
torchrun give the parameters of 1 process with the same global batch."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm.models import checkpoint
from adm.training import state as train_state

STEPS = 6
ARGS = [
    "--preset", "tiny_diffusion", "--set", "unet.image_size=16", "--set", "unet.channel_mult=1,2",
    "--set", "unet.attention_ds=2", "--set", "diffusion.steps=100", "--fit-classes",
    "--label-dropout", "0.2", "--steps", str(STEPS), "--batch-size", "4", "--microbatch", "3",
    "--save-interval", "2", "--log-interval", "2", "--ema-rate", "0.9,0.99",
    "--timestep-sampler", "loss-second-moment", "--lr", "1e-4", "--anneal-lr", "--no-progress",
]  # fmt: skip
DROPOUT = ["--set", "unet.dropout=0.1"]  # the kill tests: each step's dropout must resume too
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _adm(*extra: str) -> list[str]:
    return [sys.executable, "-m", "adm.cli.main", "train", *ARGS, *extra]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red", "green", "blue"]):
        for i in range(4):
            arr = (rng.random((20, 20, 3)) * 60).astype(np.uint8)
            arr[..., c] += 150
            Image.fromarray(arr).save(root / f"{name}_{i}.png")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Background:
    """Processes started at once (the 2 cores are used while another process imports torch)."""

    def __init__(self, images: Path, root: Path):
        self.reference, self.gloo = root / "reference", root / "gloo"
        self.dropout = root / "dropout"
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "adm.cli.main", "train",
        ]  # fmt: skip
        self.procs = {
            "reference": _start(_adm("--data", str(images), "--out", str(self.reference))),
            "gloo": _start([*launcher, *ARGS, "--data", str(images), "--out", str(self.gloo)]),
            "dropout": _start(_adm(*DROPOUT, "--data", str(images), "--out", str(self.dropout))),
        }

    def wait(self, name: str) -> Path:
        proc = self.procs[name]
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return getattr(self, name)


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


@pytest.fixture(scope="module")
def background(images: Path, tmp_path_factory) -> Background:
    """One uninterrupted single-process run and one 2-process gloo run, in the background."""
    runs = Background(images, tmp_path_factory.mktemp("runs"))
    yield runs
    for proc in runs.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _weights(run_dir: Path, step: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    names = ["model", "ema_0.9", "ema_0.99"]
    return {n: checkpoint.load_state_dict(run_dir / f"{n}_{step:06d}.safetensors") for n in names}


# Runs `adm` with os.replace stalled (after halving the temporary file) when it would put the
# file named ADM_TEST_STALL_AT in place: a SIGKILL then lands in the middle of that write.
_STALLING = r"""
import os, sys, time
from pathlib import Path
target, ready, real = os.environ["ADM_TEST_STALL_AT"], os.environ["ADM_TEST_READY"], os.replace
def replace(src, dst, *args, **kwargs):
    if Path(dst).name == target:
        os.truncate(src, os.path.getsize(src) // 2)
        Path(ready).touch()
        time.sleep(600)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from adm.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _kill(argv: list[str], run: Path, stall_at: str | None, then: Path) -> None:
    """Start `adm ARGV`, SIGKILL it once `then` exists (with `stall_at`: mid-write of that file)."""
    env = {**ENV, "ADM_TEST_STALL_AT": stall_at or "-", "ADM_TEST_READY": str(then)}
    cmd = [sys.executable, "-c", _STALLING, *argv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not then.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill"


def test_sigkill_at_several_moments_then_rerun_is_bitwise_equal(images, background, tmp_path):
    """Killed in the middle of writing the first model file, in the middle of writing the state
    file that completes the second checkpoint (its model and EMA files already in place), and
    just after a checkpoint: each rerun continues from the newest complete checkpoint, and the
    run ends bitwise equal to an uninterrupted one (dropout 0.1, annealed LR), with each log step
    once and no temporary file left."""
    run = tmp_path / "run"
    argv = [*_adm(*DROPOUT, "--data", str(images), "--out", str(run))[3:]]
    _kill(argv, run, "model_000002.safetensors", tmp_path / "ready1")
    assert train_state.checkpoint_steps(run) == [] and list(run.glob(".model_000002*.tmp"))
    _kill(argv, run, "state_000004.pt", tmp_path / "ready2")
    assert train_state.checkpoint_steps(run) == [2] and (run / "model_000004.safetensors").exists()
    _kill(argv, run, None, run / "state_000004.pt")
    done = train_state.checkpoint_steps(run)
    assert 4 in done and STEPS not in done, done
    subprocess.run(_adm(*DROPOUT, "--data", str(images), "--out", str(run)), env=ENV, check=True,
                   timeout=300, capture_output=True)  # fmt: skip
    assert not list(run.glob(".*.tmp"))
    reference = background.wait("dropout")
    ours, theirs = _weights(run), _weights(reference)
    for name in ours:
        for key in theirs[name]:
            assert torch.equal(ours[name][key], theirs[name][key]), (name, key)
    a, b = train_state.load_state(run, STEPS), train_state.load_state(reference, STEPS)
    for key, value in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][key]["exp_avg_sq"], value["exp_avg_sq"])
    assert torch.equal(a["sampler"]["loss_history"], b["sampler"]["loss_history"])
    # The log holds each step once, with the same losses.
    ours_log = (run / "log.csv").read_text().splitlines()
    ref_log = (reference / "log.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in ours_log] == [r.split(",")[:5] for r in ref_log]


def test_sigterm_stops_at_a_step_boundary_saves_and_resumes_bitwise(images, background, tmp_path):
    """SIGTERM (what SLURM and Kubernetes send): the step in progress finishes, a checkpoint is
    saved, one line says so, exit status 143; rerunning the same command ends bitwise equal to the
    uninterrupted run (dropout > 0 and an annealed LR, so each step's randomness must resume)."""
    cmd = _adm(*DROPOUT, "--data", str(images), "--out", str(tmp_path), "--save-interval", "100")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while "step" not in _read(tmp_path / "log.csv") and time.monotonic() < deadline:
        time.sleep(0.005)  # the header is written before the first step
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    step = max(train_state.checkpoint_steps(tmp_path))
    assert 0 < step < STEPS
    assert err.strip().splitlines()[-1] == (
        f"adm train: stopped by SIGTERM at step {step}: checkpoint saved in {tmp_path}; rerun the "
        "same command to resume"
    )
    subprocess.run(cmd, env=ENV, check=True, timeout=300, capture_output=True)
    ours, theirs = _weights(tmp_path), _weights(background.wait("dropout"))
    for name in ours:
        for key in theirs[name]:
            assert torch.equal(ours[name][key], theirs[name][key]), (name, key)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_two_gloo_processes_equal_one_process(background) -> None:
    ours, theirs = _weights(background.wait("gloo")), _weights(background.wait("reference"))
    for name in ours:
        for key in theirs[name]:
            torch.testing.assert_close(ours[name][key], theirs[name][key], rtol=0, atol=1e-4)
    # Every rank's RNG state is in the training-state file; rank 0 alone writes the log.
    assert len(train_state.load_state(background.gloo, STEPS)["rng"]) == 2
    assert len((background.gloo / "log.csv").read_text().splitlines()) == STEPS // 2 + 1
