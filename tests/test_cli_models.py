"""`adm presets`, `adm info`, `adm convert`, `adm fetch` run as a user would (in-process)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adm._util.errors import os_error_text
from adm.cli.main import main
from adm.models import checkpoint, presets
from adm.models.checkpoint import BUNDLED_DIR, load_state_dict, read_preset
from adm.models.presets import RELEASED, build_model, get_preset
from loopback_http import Served, serve


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_pt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "downloaded.pt"
    torch.save(build_model(get_preset("tiny_classifier")).state_dict(), path)
    return path


def test_presets_table_lists_every_preset_with_exact_counts(capsys) -> None:
    code, out, _ = run(capsys, "presets")
    assert code == 0
    for name in RELEASED:
        assert name in out
    assert "553,838,086" in out and "65,438,568" in out
    assert "DDPM 250 steps, 256x256_classifier scale 10.0" in out
    code, out, _ = run(capsys, "presets", "--json")
    data = json.loads(out)
    assert data["128x128_diffusion"]["num_parameters"] == 421_529_606
    assert data["64_256_upsampler"]["small_size"] == 64


def test_info_of_a_preset_name(capsys) -> None:
    code, out, _ = run(capsys, "info", "256x256_diffusion")
    assert code == 0
    assert "553,838,086" in out and "float32" in out
    assert "attention_ds             (8, 16, 32)" in out
    code, out, _ = run(capsys, "info", "256x256_diffusion", "--set", "unet.num_classes=none")
    assert "552,814,086" in out and "unet.num_classes=none" in out
    # The original's flags, pasted verbatim after the name.
    code, out, _ = run(capsys, "info", "256x256_diffusion", "--json", "--dropout", "0.3")
    assert json.loads(out)["preset"]["network"]["dropout"] == 0.3


def test_info_of_a_released_format_file(capsys, tiny_pt: Path) -> None:
    code, out, _ = run(capsys, "info", str(tiny_pt))
    assert code == 0
    assert "tiny_classifier" in out and "recognised from key names and shapes" in out
    assert "644,200" in out and "dtype         float32" in out


def test_convert_round_trip_and_info(capsys, tmp_path: Path, tiny_pt: Path) -> None:
    st_path, back = tmp_path / "c.safetensors", tmp_path / "back.pt"
    assert run(capsys, "convert", str(tiny_pt), str(st_path))[0] == 0
    code, out, _ = run(capsys, "info", str(st_path))
    assert code == 0 and "adm metadata" in out
    assert read_preset(st_path).name == "tiny_classifier"
    assert run(capsys, "convert", str(st_path), str(back))[0] == 0
    a, b = load_state_dict(tiny_pt), load_state_dict(back)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run(capsys, "convert", str(st_path), str(back))
    assert code == 2 and "--force" in err
    half = tmp_path / "half.safetensors"
    assert run(capsys, "convert", str(back), str(half), "--dtype", "fp16")[0] == 0
    assert "dtype         float16" in run(capsys, "info", str(half))[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "256x256_difusion"], "did you mean 256x256_diffusion"),
        (["info", "tiny_diffusion", "--set", "unet.dropout=lots"], "expected float"),
        (["info", "tiny_diffusion", "--num_chanels", "3"], "did you mean --num_channels"),
        (["convert", "missing.pt", "out.safetensors"], "no such file"),
        (["convert", "a.pt", "b.bin"], "must end in .safetensors or .pt"),
        (["fetch", "stable_diffusion"], "unknown preset"),
        (["fetch", "tiny_diffusion"], "no released weights"),
        (
            ["fetch", "64x64_classifier", "--cache-dir", "/proc/adm/cache"],
            "cannot create cache folder /proc/adm/cache: /proc does not accept new files",
        ),
        (
            ["convert", "fmnist_judge.safetensors", "/proc/adm/judge.pt"],
            "cannot create output folder /proc/adm: /proc does not accept new files",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_2(capsys, argv: list[str], message: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_info_of_a_bundled_name_describes_its_file(capsys) -> None:
    code, out, _ = run(capsys, "info", "fmnist_diffusion")
    assert code == 0
    assert str(BUNDLED_DIR / "fmnist_diffusion.safetensors") + " (bundled with adm)" in out
    assert "adm metadata" in out and "1,370,242" in out and "weights bundled with adm" in out
    code, out, _ = run(capsys, "info", "fmnist_judge", "--json")
    assert json.loads(out)["preset"]["name"] == "fmnist_judge"


def test_presets_say_which_weights_are_bundled(capsys) -> None:
    code, out, _ = run(capsys, "presets")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert [rows[n][4] for n in ("fmnist_diffusion", "fmnist_classifier", "fmnist_judge")] == [
        "bundled"
    ] * 3
    assert rows["256x256_diffusion"][4] == "released" and rows["tiny_diffusion"][4] == "none"
    assert code == 0
    code, out, _ = run(capsys, "presets", "--json")
    assert code == 0
    weights = {n: p["weights"] for n, p in json.loads(out).items()}
    assert weights["fmnist_judge"] == "bundled" and weights["64_256_upsampler"] == "released"


def test_fetch_of_a_bundled_name_points_at_the_file(capsys, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "fetch", "fmnist_judge", "--cache-dir", str(tmp_path / "c"))
    assert code == 0 and "nothing to download" in out
    assert str(BUNDLED_DIR / "fmnist_judge.safetensors") in out
    assert not (tmp_path / "c").exists()


def test_output_folders_that_cannot_be_made_are_one_sentence(capsys, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["convert", "fmnist_judge", str(blocker / "judge.pt")], "a_file: it is a file, not a"),
        (["fetch", "64x64_classifier", "--cache-dir", str(blocker)], "it is a file, not a folder"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert "Errno" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_os_errors_read_as_sentences(capsys, tmp_path: Path) -> None:
    assert os_error_text(PermissionError(13, "Permission denied", "/data/x")) == (
        "/data/x: permission denied"
    )
    renamed = IsADirectoryError(21, "Is a directory", "/tmp/.x.tmp", None, "/out/x.pt")
    assert os_error_text(renamed) == "/out/x.pt: is a folder, not a file"
    assert os_error_text(OSError("no errno")) == "no errno"
    (tmp_path / "x.pt").mkdir()
    code, _, err = run(capsys, "convert", "fmnist_judge", str(tmp_path / "x.pt"), "--force")
    assert code == 2 and "is a folder: OUT must be a file name" in err


def test_info_and_convert_report_bad_files(capsys, tmp_path: Path) -> None:
    page = tmp_path / "256x256_diffusion.pt"
    page.write_text("<html><body>Access denied</body></html>")
    code, _, err = run(capsys, "info", str(page))
    assert code == 2 and "HTML" in err and str(page) in err
    code, _, err = run(capsys, "convert", str(page), str(tmp_path / "x.safetensors"))
    assert code == 2 and "HTML" in err


def test_fetch_from_a_loopback_server(capsys, tmp_path: Path) -> None:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(build_model(get_preset("tiny_classifier")).state_dict(), buffer)
    with serve(Served(files={"/tiny.pt": buffer.getvalue()})) as served:
        code, out, _ = run(capsys, "fetch", "tiny_classifier", "--cache-dir", str(tmp_path),
                           "--url", served.base_url + "/tiny.pt", "--no-progress")  # fmt: skip
    assert code == 0
    assert (tmp_path / "tiny_classifier.pt").read_bytes() == buffer.getvalue()
    assert str(tmp_path / "tiny_classifier.pt") in out


def test_console_script_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adm", "info", "128x128_classifier"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "42,568,040" in result.stdout


@pytest.mark.parametrize(("name", "classes"), [("tiny_diffusion", 4), ("tiny_classifier", 3)])
def test_a_fit_classes_model_saved_as_pt_loads_and_info_names_the_change(
    capsys, tmp_path: Path, name: str, classes: int
) -> None:
    """Training with --fit-classes resizes the label rows or the logits; a `.pt` of such a model
    (no metadata) is recognised from its shapes as the preset with that label count."""
    fitted = presets.with_outputs(presets.get_preset(name), classes)
    pt = checkpoint.save_model(presets.build_model(fitted), fitted, tmp_path / "fitted.pt")
    _, found = checkpoint.load_model(pt)
    assert found.network == fitted.network and presets.num_outputs(found) == classes
    assert main(["info", str(pt)]) == 0
    field = "out_channels 1000" if name == "tiny_classifier" else "num_classes 1000"
    assert f"(modified from {name}: {field} -> {classes})" in capsys.readouterr().out


def test_info_warns_when_the_weights_contradict_the_metadata(capsys, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(checkpoint.resolve_checkpoint("fmnist_diffusion"), "pt") as f:
        metadata = f.metadata()
    tiny = presets.build_model(presets.get_preset("tiny_diffusion")).state_dict()
    save_file({k: v.contiguous() for k, v in tiny.items()}, tmp_path / "m.safetensors",
              metadata=metadata)  # fmt: skip
    assert main(["info", str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"warning: {tmp_path / 'm.safetensors'}: the "
        "weights do not fit the config in its metadata ("
    )
    assert err[0].endswith("no adm command will load this file")
