"""No option value ever gives a traceback (issue 16): Hypothesis draws values for the options of
`adm sample` and `adm train` — numbers of every size and sign, nan and inf, garbage text — and
each either runs (exit 0; for sampling 1 only for a diverged batch) or stops with exit 2 and one
line, before any run folder is made."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from adm.cli import main as cli

OPTIONS = ["--classifier-scale", "--cfg-scale", "--cfg-null-label", "--eta", "--churn",
           "--s-noise", "--order", "--guidance-interval", "--num-samples", "--batch-size",
           "--seed", "--steps", "--classes", "--grid", "--sampler", "--precision",
           "--device"]  # fmt: skip

SLOW = {"--num-samples": 10**11, "--steps": 1001}  # above these the value is refused


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _run(argv: list[str]) -> tuple[int, str]:
    """The exit status and standard error of `adm ARGV`, run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exit:  # argparse
            code = exit.code
    return code, err.getvalue()


NUMBERS = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 3, -1, 0.5, 1e-300, 1e300]),
).map(str)
TEXT = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12),
    st.sampled_from(["", ",", "1,", "a,b", "nan,1", "1,inf", "ddim3", "karras", "cuda:7", "-"]),
)
TRAIN_TEXT = st.one_of(
    TEXT,
    st.sampled_from(["0.9,", "bf16", "fp16", "unet.dropout=2", "unet.num_classes=none", "x.y=1",
                     "unet.image_size=0", "diffusion.steps=-5", "loss-second-moment"]),
)  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option=st.sampled_from(OPTIONS), value=st.one_of(NUMBERS, TEXT),
       guided=st.booleans())  # fmt: skip
def test_any_option_value_runs_or_is_one_line(option, value, guided):
    # valid values that are merely slow (10⁶ samples, 900 steps) are not what this looks for
    assume(
        not (option in SLOW and _integer(value) is not None and 4 < _integer(value) < SLOW[option])
    )
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["sample", "--checkpoint", "fmnist_diffusion", "--num-samples", "1", "--steps",
                "2", "--out", f"{tmp}/run", "--no-progress"]  # fmt: skip
        if guided:
            argv += ["--classifier", "fmnist_classifier"]
        argv += [f"{option}={value}"]  # "=" so that a value may start with "-"
        code, err = _run(argv)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 1, 2), (argv, code)
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("adm sample: error: "), (argv, lines)


TRAIN_OPTIONS = ["--batch-size", "--microbatch", "--lr", "--weight-decay", "--ema-rate",
                 "--grad-clip", "--label-dropout", "--save-interval", "--log-interval",
                 "--sample-interval", "--num-samples", "--sample-steps", "--workers", "--seed",
                 "--steps", "--keep", "--precision", "--timestep-sampler", "--set", "--labels",
                 "--device"]  # fmt: skip

# Valid values that merely take long (a million steps, a batch of 10⁸ images) are not what this
# looks for; above these bounds the value must be refused, or run quickly.
TRAIN_SLOW = {"--steps": 10**9, "--batch-size": 10**9, "--num-samples": 10**9,
              "--sample-steps": 10**9, "--microbatch": 10**9}  # fmt: skip


@pytest.fixture(scope="module")
def images() -> Path:
    root = Path(tempfile.mkdtemp(prefix="adm-prop-"))
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(root / f"c{i % 2}_{i}.png")
    return root


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(option=st.sampled_from(TRAIN_OPTIONS), value=st.one_of(NUMBERS, TRAIN_TEXT))
def test_any_train_option_value_runs_or_is_one_line(images, option, value):
    number = _integer(value)
    assume(not (option in TRAIN_SLOW and number is not None and 8 < number < TRAIN_SLOW[option]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = ["train", "--preset", "tiny_diffusion", "--set", "unet.image_size=16", "--set",
                "unet.channel_mult=1,2", "--set", "diffusion.steps=20", "--data", str(images),
                "--out", str(out), "--steps", "1", "--batch-size", "2", "--no-progress",
                f"{option}={value}"]  # fmt: skip
        code, err = _run(argv)
        made = out.exists()
    lines = err.strip().splitlines()
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, lines[-3:])
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("adm train: error: "), (argv, lines)
        assert not made, argv
