"""Non-finite numbers never turn into black images with exit 0 (issue 16): float options must be
finite, a checkpoint with NaN weights is refused at load, and a batch that diverges stops the run
with exit 1 before anything of it is written. Run through the CLI, as a user hits them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from adm.cli import main as cli
from adm.models import checkpoint, presets


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classifier", "fmnist_classifier", "--classifier-scale", "nan"],
         "--classifier-scale must be a finite number, got nan"),
        (["--classifier", "fmnist_classifier", "--classifier-scale=-inf"],
         "--classifier-scale must be a finite number, got -inf"),
        (["--cfg-scale", "inf"], "--cfg-scale must be a finite number, got inf"),
        (["--sampler", "ddim", "--eta", "nan"], "--eta must be a finite number, got nan"),
        (["--sampler", "edm", "--grid", "karras", "--steps", "4", "--s-noise", "inf"],
         "--s-noise must be a finite number, got inf"),
    ],
)  # fmt: skip
def test_non_finite_options_are_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    argv = ["sample", "--checkpoint", "fmnist_diffusion", "--num-samples", "2", "--out", str(out)]
    assert cli.main([*argv, *extra]) == 2
    assert capsys.readouterr().err.strip() == f"adm sample: error: {message}"
    assert not out.exists()


def test_checkpoint_with_nan_weights_is_refused(tmp_path, capsys):
    preset = presets.get_preset("tiny_diffusion")
    torch.manual_seed(0)
    model = presets.build_model(preset)
    with torch.no_grad():
        next(model.parameters()).view(-1)[3] = float("nan")
    path = checkpoint.save_model(model, preset, tmp_path / "diverged.safetensors")
    argv = ["sample", "--checkpoint", str(path), "--num-samples", "2", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"adm sample: error: {path}: 1 tensor(s) hold NaN or inf values (e.g. ")
    assert err.endswith("the checkpoint is damaged or comes from a diverged training run")
    assert not (tmp_path / "o").exists()


def test_a_diverging_batch_stops_with_exit_1_and_writes_nothing_of_it(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "adm", "sample", "--checkpoint", "fmnist_diffusion",
           "--classifier", "fmnist_classifier", "--classifier-scale", "1e38", "--steps", "3",
           "--num-samples", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "adm sample: error: sampling produced NaN or inf in batch 0 (samples 0-1); nothing of it "
        "was written (finished batches are kept). A guidance scale too large for this precision, "
        "or a diverged model, causes this"
    ]
    assert list((out / "batches").iterdir()) == [] and not list(out.glob("samples_*.npz"))


def test_sigint_stops_sampling_between_batches_and_resume_completes(tmp_path):
    """Ctrl-C: the batch in progress is finished and kept, one line says how to continue (exit
    130); `--resume` then draws only the rest, and the result equals an uninterrupted run."""
    import os
    import signal
    import time

    import numpy as np

    def cmd(out, *extra):
        return [sys.executable, "-m", "adm", "sample", "--checkpoint", "fmnist_diffusion",
                "--num-samples", "4", "--batch-size", "1", "--steps", "10", "--out", str(out),
                "--no-progress", *extra]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd(tmp_path / "cut"), env=env, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "cut" / "batches" / "batch_000000.npz"
    deadline = time.monotonic() + 240
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("adm sample: stopped by SIGINT with ") and " of 4 batches finished" in last
    )
    assert last.endswith("rerun the same command with --resume to continue")
    assert not list((tmp_path / "cut").glob("samples_*.npz"))
    done = subprocess.run(cmd(tmp_path / "cut", "--resume"), env=env, capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    whole = subprocess.run(cmd(tmp_path / "whole"), env=env, capture_output=True)
    assert whole.returncode == 0
    a = np.load(tmp_path / "cut" / "samples_4x28x28x1.npz")["arr_0"]
    np.testing.assert_array_equal(a, np.load(tmp_path / "whole" / "samples_4x28x28x1.npz")["arr_0"])


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--ema-rate", ","], 2, "--ema-rate ',': expected rates like 0.9999,0.999"),
        (["--weight-decay", "inf"], 2, "weight decay must be a finite number >= 0, got inf"),
        (["--grad-clip", "nan"], 2, "grad clip must be a positive finite number, got nan"),
        (["--lr", "nan"], 2, "lr must be positive, got nan"),
        (["--init-from", "fmnist_classifier"], 1,
         "--init-from fmnist_classifier: its weights do not fit tiny_diffusion (missing "),
    ],
)  # fmt: skip
def test_training_numbers_and_init_checkpoints_are_checked(tmp_path, capsys, extra, code, message):
    import numpy as np
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(np.full((12, 12, 3), 60 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    out = tmp_path / "run"
    data = ["--data", str(tmp_path / "imgs"), "--out", str(out), "--no-progress"]
    argv = ["train", "--preset", "tiny_diffusion", "--set", "unet.image_size=16", "--steps", "1",
            *data, *extra]  # fmt: skip
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()  # nothing written, not even the folder


def _tiny_training(tmp_path, steps: int) -> list[str]:
    import numpy as np
    from PIL import Image

    data = tmp_path / "imgs"
    if not data.exists():
        data.mkdir()
        for i in range(4):
            Image.fromarray(np.full((12, 12, 3), 60 * i, np.uint8)).save(data / f"{i}.png")
    return ["train", "--preset", "tiny_diffusion", "--set", "unet.image_size=16", "--data",
            str(data), "--out", str(tmp_path / "run"), "--steps", str(steps), "--batch-size", "2",
            "--save-interval", "2", "--no-progress"]  # fmt: skip


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    from adm.training import state as train_state

    assert cli.main(_tiny_training(tmp_path, 4)) == 0
    state = tmp_path / "run" / "state_000004.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a crash of the disk
    capsys.readouterr()
    assert cli.main(_tiny_training(tmp_path, 6)) == 0
    err = capsys.readouterr().err
    assert ("adm: resumed from step 2, the newest intact checkpoint; skipped the damaged step 4: "
            "state_000004.pt cannot be read") in err  # fmt: skip
    assert train_state.checkpoint_steps(tmp_path / "run")[-1] == 6


def test_disk_full_while_saving_is_one_line_naming_the_intact_checkpoint(tmp_path, capsys,
                                                                          monkeypatch):  # fmt: skip
    import errno

    from adm.models import checkpoint

    real, calls = checkpoint.save_model, []

    def full_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_model", full_on_second)
    assert cli.main(_tiny_training(tmp_path, 4)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"adm train: error: no space left on device while writing the checkpoint "
                       f"of step 4 in {tmp_path / 'run'}; the previous checkpoint (step 2) is "
                       "intact")  # fmt: skip


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"arr_0": (0, 16, 16, 3), "arr_1": [0] * 0}, "holds no images (arr_0 is empty)"),
        ({"arr_0": (2, 16, 16, 3), "arr_1": [-1, -5]}, "label -5 is out of range (0..999)"),
        ({"arr_0": (2, 16, 16, 3), "arr_1": [0.5, 1.0]},
         "arr_1 must hold one integer label per image (2), got float64 (2,)"),
    ],
)  # fmt: skip
def test_upsample_bases_without_images_or_with_bad_labels_are_one_line(tmp_path, capsys, arrays,
                                                                       message):  # fmt: skip
    import numpy as np

    base = tmp_path / "base.npz"
    np.savez(base, arr_0=np.zeros(arrays["arr_0"], np.uint8), arr_1=np.array(arrays["arr_1"]))
    out = tmp_path / "up"
    argv = ["upsample", "--preset", "tiny_upsampler", "--base", str(base), "--out", str(out),
            "--steps", "2", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"adm upsample: error: --base {base}: {message}"
    assert not out.exists()


def _forged_npz(path, shape) -> None:
    """An npz whose arr_0 header claims `shape` but holds two 16x16x3 images."""
    import io
    import zipfile

    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", header.getvalue() + bytes(2 * 16 * 16 * 3))


@pytest.mark.parametrize(
    "shape, claim",
    [((10**10, 16, 16, 3), "claims shape [10000000000, 16, 16, 3] of uint8 (7.15e+03 GiB) but "
      "holds only 1536 bytes: the file is damaged or truncated"),
     ((4, 16, 16, 3), "claims shape [4, 16, 16, 3] of uint8 (3072 bytes) but holds only 1536 "
      "bytes: the file is damaged or truncated")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["train", "upsample", "edit", "inpaint", "eval"])
def test_an_npz_claiming_more_than_it_holds_is_one_line(tmp_path, capsys, shape, claim, command):
    """A forged or truncated header (numpy would allocate the claimed terabytes first, then fail
    with a MemoryError traceback) is refused by every command that reads an npz, before work."""
    bad = tmp_path / "bad.npz"
    _forged_npz(bad, shape)
    out = str(tmp_path / "out")
    argv = {
        "train": ["train", "--preset", "tiny_diffusion", "--set", "unet.image_size=16", "--data",
                  str(bad), "--steps", "1", "--out", out],
        "upsample": ["upsample", "--preset", "tiny_upsampler", "--base", str(bad), "--out", out],
        "edit": ["edit", "--checkpoint", "fmnist_diffusion", "--images", str(bad), "--strength",
                 "0.5", "--out", out],
        "inpaint": ["inpaint", "--checkpoint", "fmnist_diffusion", "--images", str(bad),
                    "--masks", str(bad), "--out", out],
        "eval": ["eval", str(bad), str(bad)],
    }[command]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("warning: tiny_upsampler built with")]
    assert len(err) == 1 and err[0].startswith(f"adm {command}: error: "), err
    assert f"{bad}: arr_0 {claim}" in err[0], err
    assert not (tmp_path / "out").exists()


_METADATA = [
    ("[1, 2]", "expected a JSON object, got list"),
    ("{nope", "Expecting property name enclosed in double quotes"),
    ("{}", "unsupported adm config format"),
    ("DROP:diffusion", "invalid adm config: KeyError('diffusion')"),
    ("ADD:zzz", "unexpected keyword argument 'zzz'"),
    ("SET:network=5", "invalid adm config: TypeError"),
]


@pytest.mark.parametrize(
    "command, text, reason",
    [("info", *case) for case in _METADATA] + [("sample", *case) for case in _METADATA[:2]],
)
def test_malformed_safetensors_metadata_is_one_line(tmp_path, capsys, command, text, reason):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    source = checkpoint.resolve_checkpoint("fmnist_diffusion")
    with safe_open(source, "pt") as f:
        config = json.loads(f.metadata()[checkpoint.METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    if text.startswith("DROP:"):
        text = json.dumps({k: v for k, v in config.items() if k != text[5:]})
    elif text.startswith("ADD:"):
        text = json.dumps({**config, text[4:]: 1})
    elif text.startswith("SET:"):
        key, value = text[4:].split("=")
        text = json.dumps({**config, key: json.loads(value)})
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={"format": "pt", checkpoint.METADATA_KEY: text})
    argv = {"info": ["info", str(bad)],
            "sample": ["sample", "--checkpoint", str(bad), "--num-samples", "1", "--steps", "2",
                       "--out", str(tmp_path / "out")]}[command]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"adm {command}: error: {bad}: unreadable adm config in the metadata")
    assert reason in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_second_signal_exits_at_once_with_its_status():
    """The first SIGTERM only asks the loop to stop at its next boundary; a second one exits at
    once (every write is atomic, so nothing is left half-written), with status 143."""
    code = (
        "import os, signal, time\n"
        "from adm._util import signals\n"
        "with signals.stop_on_signals():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert signals.requested() == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143 and "not reached" not in done.stdout
    assert [line for line in done.stderr.splitlines() if line] == [
        "adm: SIGTERM received: stopping at the next step boundary (send it again to stop at once)",
        "adm: second SIGTERM: stopping at once",
    ]
