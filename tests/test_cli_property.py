"""No option value ever gives a traceback (issue 16): Hypothesis draws values for `adm sample`'s
options — numbers of every size and sign, nan and inf, garbage text — and each either runs
(exit 0; 1 only for a diverged batch) or stops with exit 2 and one line."""

from __future__ import annotations

import contextlib
import io
import tempfile

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

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


NUMBERS = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 3, -1, 0.5, 1e-300, 1e300]),
).map(str)
TEXT = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12),
    st.sampled_from(["", ",", "1,", "a,b", "nan,1", "1,inf", "ddim3", "karras", "cuda:7", "-"]),
)


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
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
            except SystemExit as exit:  # argparse
                code = exit.code
    lines = err.getvalue().strip().splitlines()
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
    assert code in (0, 1, 2), (argv, code)
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("adm sample: error: "), (argv, lines)
