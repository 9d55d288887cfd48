"""The original's flag lines and constructor kwargs translate into typed configs."""

from __future__ import annotations

import json

import pytest

from adm.cli import main as cli
from adm.models import flags
from adm.nets.classifier import ClassifierConfig
from adm.nets.unet import UNetConfig

FLAGS_256 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)


def test_readme_flag_line_of_the_256_model():
    net, diff = flags.model_and_diffusion_from_flags(flags.parse_flag_line(FLAGS_256))
    assert isinstance(net, UNetConfig)
    assert net.attention_ds == (8, 16, 32)
    assert net.channel_mult == (1, 1, 2, 2, 4, 4)
    assert net.num_classes == 1000 and net.out_channels == 6 and net.num_head_channels == 64
    assert (diff.var_type, diff.loss_type, diff.mean_type) == ("learned_range", "mse", "eps")


def test_classifier_and_superres_flag_lines():
    clf, _ = flags.model_and_diffusion_from_flags(
        flags.parse_flag_line("--image_size 64 --classifier_depth 4 --classifier_pool attention")
    )
    assert isinstance(clf, ClassifierConfig)
    assert clf.num_res_blocks == 4 and clf.attention_ds == (2, 4, 8) and clf.num_head_channels == 64
    sr, small = flags.superres_from_flags(
        flags.parse_flag_line("--large_size 256 --small_size 64 --num_heads 4 --learn_sigma True")
    )
    assert small == 64 and sr.image_size == 256 and sr.channel_mult == (1, 1, 2, 2, 4, 4)


def test_diffusion_flags_and_overrides():
    d = flags.diffusion_from_flags({"use_kl": True, "predict_xstart": True, "steps": 4000})
    assert (d.loss_type, d.mean_type, d.steps) == ("rescaled_kl", "x0", 4000)
    d = flags.apply_overrides(d, {"model_mean_type": "PREVIOUS_X", "loss_type": "KL"})
    assert (d.mean_type, d.loss_type) == ("prev_x", "kl")
    with pytest.raises(ValueError, match="unknown model_var_type"):
        flags.apply_overrides(d, {"model_var_type": "HUGE"})


def test_bad_flags_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="did you mean --num_channels"):
        flags.parse_flag_line("--num_channel 64")
    with pytest.raises(ValueError, match="expects a boolean"):
        flags.parse_flag_line("--class_cond maybe")
    with pytest.raises(ValueError, match="has no value"):
        flags.parse_flag_line("--num_channels")
    with pytest.raises(ValueError, match="no default channel_mult for image size 32"):
        flags.unet_from_flags({"image_size": 32})


def test_fractional_channel_mult_is_accepted():
    net = flags.unet_from_flags({"image_size": 512, "channel_mult": "0.5,1,1,2,2,4,4"})
    assert net.channel_mult == (0.5, 1, 1, 2, 2, 4, 4)


def test_constructor_kwargs_translation_rejects_unknown_arguments():
    with pytest.raises(ValueError, match="unsupported UNetModel argument"):
        flags.config_from_constructor("UNetModel", {"image_size": 16, "mystery": 1})
    with pytest.raises(ValueError, match="only 2-D"):
        flags.config_from_constructor("UNetModel", {"dims": 3})


def test_cli_flags_prints_resolved_configs(capsys):
    assert cli.main(["flags", *FLAGS_256.split()]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["class"] == "UNetConfig"
    assert printed["model"]["attention_ds"] == [8, 16, 32]
    assert cli.main(["flags", "--num_chanels", "3"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_constructor_kwargs_left_out_take_the_original_defaults():
    clf = flags.config_from_constructor(
        "EncoderUNetModel",
        {"image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 10,
         "num_res_blocks": 1, "attention_resolutions": [2]},
    )  # fmt: skip
    assert clf.pool == "adaptive" and clf.num_head_channels is None
    assert not clf.use_scale_shift_norm and not clf.resblock_updown
