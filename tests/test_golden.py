"""Golden harness: every `*.json` case in the repository's `tests/golden` (or `$ADM_GOLDEN_DIR`),
dispatched on its `kind`, every output array compared at the json's tolerances.

No case-specific code: networks, diffusions, labels, loops and settings all come from the json and
the npz, so other case sets of the same kinds (other sizes, seeds, settings) run unchanged. A
missing or empty case set, an unknown kind, a missing array, an output no checker produces, an
array a checker produces that the json does not list, and an input no checker reads are failures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm.data import datasets as data
from adm.diffusion import gaussian, guidance, samplers
from adm.diffusion.gaussian import Diffusion
from adm.diffusion.schedule import NoiseSchedule, named_betas, space_timesteps
from adm.models import flags
from adm.nets.nn import qkv_attention, timestep_embedding
from conftest import golden_dir, golden_problem


class Case:
    """One fixture: the json description and its npz arrays; remembers which arrays were read."""

    def __init__(self, name: str, meta: dict, arrays: dict[str, np.ndarray]):
        self.name, self.meta, self.arrays = name, meta, arrays
        self.params = {**meta.get("config", {}), **meta.get("params", {})}
        self.read: set[str] = set()

    @classmethod
    def load(cls, path: Path) -> Case:
        npz_path = path.with_suffix(".npz")
        arrays = dict(np.load(npz_path)) if npz_path.exists() else {}
        return cls(path.stem, json.loads(path.read_text()), arrays)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.arrays:
            pytest.fail(f"{self.name}: array {name!r} is missing from the fixture")
        self.read.add(name)
        return torch.from_numpy(self.arrays[name])

    def has(self, name: str) -> bool:
        return name in self.arrays

    def lists(self, name: str) -> bool:
        return name in self.meta["arrays"]

    def listed(self, by_products: dict) -> dict:
        """The by-products the json lists: a case stores only some of what one operation returns
        (two of p_mean_variance's four outputs, a step's sample but not its x0 guess). Anything else
        a checker returns must be listed."""
        return {k: v for k, v in by_products.items() if self.lists(k)}

    def output_names(self) -> list[str]:
        return [n for n in self.meta["arrays"] if n.startswith("output/")]

    def first(self, *names: str) -> str | None:
        """The first of these array names the fixture stores."""
        return next((n for n in names if self.has(n)), None)

    def labels(self, batch: int, prefix: str | None = None) -> torch.Tensor | None:
        """Class labels for a batch of `batch` images: `input/<prefix>_y` when stored (labels of a
        second batch, such as the bits/dim loop's), else `input/y`; None if the case has none."""
        name = self.first(*([f"input/{prefix}_y"] if prefix else []), "input/y")
        if name is None:
            return None
        y = self[name]
        if y.shape != (batch,):
            pytest.fail(f"{self.name}: {name} has shape {list(y.shape)}, the batch has {batch}")
        return y

    def network(self, name: str) -> torch.nn.Module:
        spec = self.meta["models"][name]
        config = flags.config_from_constructor(spec["class"], spec["kwargs"])
        if spec.get("create_function") == "create_model":
            # Built through the original flag helper: our flag translation must agree.
            assert flags.unet_from_flags(spec["create_flags"]) == config
        net = flags.build_network(spec["class"], config)
        prefix = spec["state_dict_prefix"]
        state = {
            k[len(prefix) :]: torch.from_numpy(v)
            for k, v in self.arrays.items()
            if k.startswith(prefix)
        }
        keys = [(k, list(v.shape)) for k, v in net.state_dict().items()]
        assert keys == [tuple(e) for e in spec["state_dict_keys"]]
        net.load_state_dict(state, strict=True)
        assert sum(p.numel() for p in net.parameters()) == spec["num_parameters"]
        return net.eval()

    def diffusion(self, name: str) -> Diffusion:
        spec = self.meta["diffusions"][name]
        config = flags.diffusion_from_flags(spec["create_gaussian_diffusion"])
        config = flags.apply_overrides(config, spec.get("overrides", {}))
        diff = Diffusion.from_config(config)
        resolved = spec["resolved"]
        assert diff.mean_type == flags._MEAN_TYPES[resolved["model_mean_type"]]
        assert diff.var_type == flags._VAR_TYPES[resolved["model_var_type"]]
        assert diff.loss_type == flags._LOSS_TYPES[resolved["loss_type"]]
        assert diff.schedule.timestep_map.tolist() == resolved["timestep_map"]
        assert diff.schedule.original_num_steps == resolved["original_num_steps"]
        return diff


def model_fn_for(net: torch.nn.Module, y: torch.Tensor | None, **cond) -> Callable:
    """The sampling scripts' model_fn, `model(x, t, y if class_cond else None)`: labels only for
    class-conditional networks, which fail clearly when the case stores none."""
    num_classes = getattr(getattr(net, "config", None), "num_classes", None)
    if num_classes is not None and y is None:
        pytest.fail(f"class-conditional network ({num_classes} classes) but no input/y in the case")

    def model_fn(x, t, **_):
        return net(x, t, **cond, **({"y": y} if num_classes is not None else {}))

    return model_fn


def loop_outputs(
    case: Case, prefix: str, steps: Iterator[samplers.SampleStep], seen_t: list | None = None
) -> dict:
    """A loop's outputs: the sample after each step, and where the json lists them the x0 guess
    after each step and the timesteps cond_fn received (`seen_t`, filled while the loop runs)."""
    steps = list(steps)
    extra = {f"{prefix}/pred_xstart": torch.stack([s.pred_x0 for s in steps])}
    if seen_t is not None:
        extra[f"{prefix}/cond_fn_timesteps"] = torch.stack(seen_t)
    return {f"{prefix}/samples": torch.stack([s.sample for s in steps]), **case.listed(extra)}


def step_outputs(case: Case, prefix: str, sample: torch.Tensor, pred_x0: torch.Tensor) -> dict:
    """One sampler step's outputs: its sample, and its x0 guess where the json lists it."""
    return {f"{prefix}/sample": sample, **case.listed({f"{prefix}/pred_xstart": pred_x0})}


def _pmv(case: Case, prefix: str, pmv: gaussian.PMeanVar) -> dict:
    """The p_mean_variance outputs the json lists."""
    return case.listed(
        {
            f"{prefix}/mean": pmv.mean,
            f"{prefix}/variance": pmv.variance,
            f"{prefix}/log_variance": pmv.log_variance,
            f"{prefix}/pred_xstart": pmv.pred_x0,
        }
    )


def scale_name(scale: float) -> str:
    return f"scale_{float(scale)}"


# ---- one checker per kind: Case -> {output name: computed tensor} --------------------------------


def check_schedules(case: Case) -> dict:
    out = {}
    p = case.params
    for name, steps in p["full_schedules"]:
        sched = NoiseSchedule.from_name(name, steps)
        prefix = f"output/{name}_T{steps}/"
        for array in case.output_names():
            if array.startswith(prefix):
                out[array] = torch.from_numpy(np.array(getattr(sched, array[len(prefix) :])))
    for name, steps in p["betas_only"]:
        out[f"output/{name}_T{steps}/betas"] = torch.from_numpy(named_betas(name, steps))
    for steps, spec in p["respacings"]:
        kept = space_timesteps(steps, spec)
        out[f"output/space_timesteps/T{steps}/{spec}"] = torch.tensor(kept, dtype=torch.int64)
    for name, steps, spec in p["spaced"]:
        sched = NoiseSchedule.from_name(name, steps).respace(spec)
        for table in ("timestep_map", "betas", "alphas_cumprod", "posterior_log_variance_clipped"):
            value = torch.from_numpy(np.array(getattr(sched, table)))
            out[f"output/spaced/{name}_T{steps}_{spec}/{table}"] = value
    for steps, spec, _reason in case.meta["expected_errors"]:
        with pytest.raises(ValueError, match=re.escape(spec)):
            NoiseSchedule.from_name("linear", steps).respace(spec)
    return out


def check_primitives(case: Case) -> dict:
    p = case.params
    out = {}
    for dim in p["emb_dims"]:
        for period in p["max_periods"]:
            emb = timestep_embedding(case["input/timesteps"], dim, period)
            out[f"output/timestep_embedding/dim{dim}_maxperiod{period}"] = emb
    m1, lv1, m2, lv2 = (case[f"input/kl_{n}"] for n in ("mean1", "logvar1", "mean2", "logvar2"))
    out["output/normal_kl"] = gaussian.normal_kl(m1, lv1, m2, lv2)
    out["output/normal_kl_vs_standard"] = gaussian.normal_kl(m1, lv1, 0.0, 0.0)
    out["output/approx_standard_normal_cdf"] = gaussian.approx_standard_normal_cdf(
        case["input/cdf_x"]
    )
    out["output/discretized_gaussian_log_likelihood"] = (
        gaussian.discretized_gaussian_log_likelihood(
            case["input/dgll_x"],
            means=case["input/dgll_means"],
            log_scales=case["input/dgll_log_scales"],
        )
    )
    qkv = case["input/qkv"]
    out["output/qkv_attention_new_order"] = qkv_attention(qkv, p["n_heads"], legacy=False)
    out["output/qkv_attention_legacy"] = qkv_attention(qkv, p["n_heads"], legacy=True)
    return out


def check_unet_forward(case: Case) -> dict:
    net, x = case.network("model"), case["input/x"]
    model_fn = model_fn_for(net, case.labels(len(x)))
    captured: dict[str, torch.Tensor] = {}
    hooks = {
        "debug/time_embed": net.time_embed,
        "debug/last_input_block": net.input_blocks[-1],
        "debug/middle_block": net.middle_block,
        "debug/first_output_block": net.output_blocks[0],
    }
    handles = [
        module.register_forward_hook(lambda _m, _i, o, name=name: captured.setdefault(name, o))
        for name, module in hooks.items()
    ]
    with torch.no_grad():
        out = {"output/model_output": model_fn(x, case["input/t"])}
        for h in handles:
            h.remove()
        out["output/model_output_float_t"] = model_fn(x, case["input/t_float"])
    return {**out, **captured}


def check_classifier(case: Case) -> dict:
    clf = case.network("classifier")
    x, t, y = case["input/x"], case["input/t_classifier"], case["input/y"]
    with torch.no_grad():
        out = {"output/classifier_logits": clf(x, t)}
    for scale in case.params["scales"]:
        cond_fn = guidance.classifier_cond_fn(clf, scale)
        out[f"output/cond_fn_grad/{scale_name(scale)}"] = cond_fn(x, t, y=y)
    return out


def check_superres(case: Case) -> dict:
    from adm.nets.unet import upsample_low_res

    net = case.network("model")
    x, low_res = case["input/x"], case["input/low_res"]
    model_fn = model_fn_for(net, case.labels(len(x)), low_res=low_res)
    out = {
        "output/low_res_from_area_downsample": data.downsample_area(
            case["input/x_large"], case.params["small_size"]
        ),
        "debug/low_res_upsampled": upsample_low_res(low_res, x.shape[-2:]),
    }
    with torch.no_grad():
        out["output/model_output"] = model_fn(x, case["input/t"])
        ddim = case.diffusion("ddim")
        sample, pred = samplers.ddim_step(model_fn, ddim, x, case["input/t_ddim"])
        out.update(step_outputs(case, "output/ddim_step", sample, pred))
        ddpm = case.diffusion("ddpm")
        sample, pred = samplers.ddpm_step(
            model_fn, ddpm, x, case["input/t_ddpm"], noise=case["input/step_noise"]
        )
        out.update(step_outputs(case, "output/ddpm_step", sample, pred))
    return out


def check_diffusion_learned(case: Case) -> dict:
    net = case.network("model")
    x0, t, noise = case["input/x_start"], case["input/t"], case["input/noise"]
    model_fn = model_fn_for(net, case.labels(len(x0)))
    diff = case.diffusion("hybrid_mse")
    out: dict[str, torch.Tensor] = {}
    q = gaussian.q_mean_variance(diff, x0, t)
    out.update(zip(("output/q_mean", "output/q_variance", "output/q_log_variance"), q, strict=True))
    x_t = gaussian.q_sample(diff, x0, t, noise)
    out["output/x_t"] = x_t
    post = gaussian.q_posterior(diff, x0, x_t, t)
    names = ("mean", "variance", "log_variance_clipped")
    out.update({f"output/q_posterior_{n}": v for n, v in zip(names, post, strict=True)})
    with torch.no_grad():
        raw = model_fn(x_t, diff.schedule.network_timesteps(t))
    out["output/model_raw_output"] = raw
    pmv = gaussian.p_mean_variance
    out.update(_pmv(case, "output/p_mean_variance_clip", pmv(diff, raw, x_t, t)))
    out.update(
        _pmv(case, "output/p_mean_variance_noclip", pmv(diff, raw, x_t, t, clip_denoised=False))
    )
    denoised = pmv(diff, raw, x_t, t, denoised_fn=lambda z: 0.9 * z)
    out.update(_pmv(case, "output/p_mean_variance_denoised_fn", denoised))
    plain = pmv(case.diffusion("learned_plain"), raw, x_t, t)
    out.update(_pmv(case, "output/p_mean_variance_learned_plain", plain))
    vb, _ = gaussian.vb_terms_bpd(diff, raw, x0, x_t, t, clip_denoised=False)
    out["output/vb_terms_bpd"] = vb
    # The training losses (and their gradient w.r.t. the network output) of every diffusion the
    # json stores them for.
    for name in case.meta["diffusions"]:
        prefix = f"output/training_losses/{name}/"
        grad_name = f"output/grad_loss_wrt_model_output/{name}"
        if not case.lists(grad_name) and not any(a.startswith(prefix) for a in case.meta["arrays"]):
            continue
        d = case.diffusion(name)
        losses = gaussian.losses_from_output(d, raw, x0, x_t, t, noise)
        out.update(case.listed({prefix + k: v for k, v in losses.items()}))
        if case.lists(grad_name):
            leaf = raw.clone().requires_grad_(True)
            total = gaussian.losses_from_output(d, leaf, x0, x_t, t, noise)["loss"].sum()
            (out[grad_name],) = torch.autograd.grad(total, leaf)
    out["output/prior_bpd"] = gaussian.prior_bpd(diff, x0)
    bpd_x0 = case["input/bpd_x_start"]
    bpd = gaussian.calc_bpd_loop(
        case.diffusion("bpd"), model_fn_for(net, case.labels(len(bpd_x0), "bpd")), bpd_x0,
        noises=case["input/bpd_noises"],
    )  # fmt: skip
    out.update({f"output/calc_bpd_loop/{k}": v for k, v in bpd.items()})
    return out


def check_diffusion_fixed(case: Case) -> dict:
    net = case.network("model")
    x0, noise = case["input/x_start"], case["input/noise"]
    model_fn = model_fn_for(net, case.labels(len(x0)))
    out: dict[str, torch.Tensor] = {}
    for name in case.meta["diffusions"]:
        diff, t = case.diffusion(name), case[f"input/t_{name}"]
        x_t = gaussian.q_sample(diff, x0, t, noise)
        out[f"output/{name}/x_t"] = x_t
        out[f"output/{name}/model_timesteps"] = diff.schedule.network_timesteps(t)
        with torch.no_grad():
            pmv = samplers.model_p_mean_variance(diff, model_fn, x_t, t)
            losses = gaussian.training_losses(diff, model_fn, x0, t, noise=noise)
        out.update(_pmv(case, f"output/{name}/p_mean_variance", pmv))
        out.update({f"output/{name}/training_losses/{k}": v for k, v in losses.items()})
    return out


def loop_noises(case: Case, loop: str, sampler: str) -> torch.Tensor:
    """Stored per-step noise of a stochastic loop: `input/<loop>_noises`, else the sampler's
    `input/<sampler>_loop_noises` (entry k is the noise drawn at loop step k)."""
    name = case.first(f"input/{loop}_noises", f"input/{sampler}_loop_noises")
    if name is None:
        pytest.fail(f"{case.name}: the stochastic loop {loop!r} has no stored per-step noise")
    return case[name]


def sampler_loop(case: Case, loop: str, model_fn: Callable, init: torch.Tensor) -> Iterator:
    """The loop an output folder names: `<sampler>_loop` (ddpm or ddim) with options `eta<x>`
    (η = x; a bare `eta` is the case's `ddim_eta`) and `clip` / `noclip`; DDIM defaults to η = 0,
    both to clipping. Stochastic loops replay their stored noise."""
    sampler, _, options = loop.partition("_loop")
    eta, clip = 0.0, True
    for option in filter(None, options.split("_")):
        if option in ("clip", "noclip"):
            clip = option == "clip"
        elif option.startswith("eta") and sampler == "ddim":
            eta = float(option[3:] or case.params["ddim_eta"])
        else:
            pytest.fail(f"{case.name}: unknown option {option!r} of the loop {loop!r}")
    diff = case.diffusion(sampler)
    if sampler == "ddpm":
        noises = loop_noises(case, loop, sampler)
        return samplers.ddpm_sample_progressive(
            model_fn, diff, init, clip_denoised=clip, step_noises=noises
        )
    noises = loop_noises(case, loop, sampler) if eta > 0 else None
    return samplers.ddim_sample_progressive(
        model_fn, diff, init, eta=eta, clip_denoised=clip, step_noises=noises
    )


LOOP_OUTPUT = re.compile(r"output/((?:ddpm|ddim)_loop[^/]*)/samples")


def check_samplers(case: Case) -> dict:
    net, x = case.network("model"), case["input/x"]
    model_fn = model_fn_for(net, case.labels(len(x)))
    ddpm, ddim = case.diffusion("ddpm"), case.diffusion("ddim")
    noise, init = case["input/step_noise"], case["input/init_noise"]
    t_step, t_ddim = case["input/t_step"], case["input/t_ddim_step"]
    eta = case.params["ddim_eta"]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        pmv = samplers.model_p_mean_variance(ddpm, model_fn, x, t_step)
        out.update(_pmv(case, "output/ddpm_step/p_mean_variance", pmv))
        s, p = samplers.ddpm_step(model_fn, ddpm, x, t_step, noise=noise)
        out.update(step_outputs(case, "output/ddpm_step", s, p))
        s, p = samplers.ddim_step(model_fn, ddim, x, t_ddim, eta=eta, noise=noise)
        out.update(step_outputs(case, "output/ddim_step_eta", s, p))
        s, p = samplers.ddim_reverse_step(model_fn, ddim, x, t_ddim)
        out.update(step_outputs(case, "output/ddim_reverse_step", s, p))
    # Every loop the json lists (ancestral, DDIM with η = 0 or η > 0), from its folder's name.
    loops = [m[1] for m in map(LOOP_OUTPUT.fullmatch, case.output_names()) if m]
    for loop in loops:
        out.update(loop_outputs(case, f"output/{loop}", sampler_loop(case, loop, model_fn, init)))
    return out


def check_guidance(case: Case) -> dict:
    net, clf = case.network("model"), case.network("classifier")
    y = case["input/y"]  # the guidance target; also the model's label if it is class-conditional
    model_fn = model_fn_for(net, y)
    kwargs = {"y": y}  # model_kwargs: cond_fn always receives y
    p = case.params
    out = {}
    with torch.no_grad():
        out["output/classifier_logits"] = clf(case["input/x"], case["input/t_classifier"])

    def recording(scale: float) -> tuple[Callable, list, list]:
        inner = guidance.classifier_cond_fn(clf, scale)
        seen_t, grads = [], []

        def cond_fn(x, t, **kw):
            seen_t.append(t)
            grads.append(inner(x, t, **kw))
            return grads[-1]

        return cond_fn, seen_t, grads

    ddpm, ddim = case.diffusion("ddpm"), case.diffusion("ddim")
    x_step, t_step, t_ddim = case["input/x_step"], case["input/t_step"], case["input/t_ddim_step"]
    for scale in p["scales"]:
        s = scale_name(scale)
        out[f"output/cond_fn_grad/{s}"] = guidance.classifier_cond_fn(clf, scale)(
            case["input/x"], case["input/t_classifier"], y=y
        )
        with torch.no_grad():
            pmv = samplers.model_p_mean_variance(
                ddpm, model_fn, x_step, t_step, model_kwargs=kwargs
            )
            out["output/ddpm_step/unguided_mean"] = pmv.mean
            out["output/ddpm_step/variance"] = pmv.variance
            cond_fn, seen_t, grads = recording(scale)
            sample, _ = samplers.ddpm_step(
                model_fn, ddpm, x_step, t_step, noise=case["input/step_noise"],
                cond_fn=cond_fn, model_kwargs=kwargs,
            )  # fmt: skip
            out[f"output/ddpm_step/{s}/sample"] = sample
            out[f"output/ddpm_step/{s}/gradient"] = grads[0]
            out[f"output/ddpm_step/{s}/cond_fn_timesteps"] = seen_t[0]
            cond_fn, seen_t, _ = recording(scale)
            pmv = samplers.model_p_mean_variance(
                ddim, model_fn, x_step, t_ddim, model_kwargs=kwargs
            )
            guided = samplers.condition_score(ddim, cond_fn, pmv, x_step, t_ddim, kwargs)
            out[f"output/condition_score/{s}/pred_xstart"] = guided.pred_x0
            out[f"output/condition_score/{s}/mean"] = guided.mean
            out[f"output/condition_score/{s}/cond_fn_timesteps"] = seen_t[0]
    init = case["input/init_noise"]
    for scale in p["ddim_loop_scales"]:
        cond_fn, seen_t, _ = recording(scale)
        loop = samplers.ddim_sample_progressive(
            model_fn, ddim, init, cond_fn=cond_fn, model_kwargs=kwargs
        )
        out.update(loop_outputs(case, f"output/guided_ddim_loop/{scale_name(scale)}", loop, seen_t))
    for scale in p.get("ddpm_loop_scales", [p["ddpm_loop_scale"]]):
        cond_fn, seen_t, _ = recording(scale)
        loop = samplers.ddpm_sample_progressive(
            model_fn, ddpm, init, cond_fn=cond_fn, model_kwargs=kwargs,
            step_noises=loop_noises(case, "guided_ddpm_loop", "ddpm"),
        )  # fmt: skip
        out.update(loop_outputs(case, f"output/guided_ddpm_loop/{scale_name(scale)}", loop, seen_t))
    return out


def check_image_preprocessing(case: Case) -> dict:
    out = {}
    for i, size in enumerate(case.params["target_sizes"]):
        image = Image.fromarray(case[f"input/image_{i}"].numpy(), mode="RGB")
        crop = data.center_crop_arr(image, size)
        out[f"output/center_crop_{i}"] = torch.from_numpy(np.array(crop))
        out[f"output/center_crop_{i}_chw_float"] = torch.from_numpy(data.to_chw_float(crop))
    return out


CHECKERS: dict[str, Callable[[Case], dict]] = {
    "schedules": check_schedules,
    "primitives": check_primitives,
    "unet_forward": check_unet_forward,
    "classifier": check_classifier,
    "superres": check_superres,
    "diffusion_learned": check_diffusion_learned,
    "diffusion_fixed": check_diffusion_fixed,
    "samplers": check_samplers,
    "guidance": check_guidance,
    "image_preprocessing": check_image_preprocessing,
}


def _case_paths() -> list:
    root = golden_dir()
    if golden_problem(root) is not None:
        return [pytest.param(root / "MISSING.json", id="golden-cases-missing")]
    return sorted(root.glob("*.json"))


def verify(case: Case, computed: dict[str, torch.Tensor]) -> None:
    """Compare what a checker computed with the case: every listed output must be produced and
    match at its tolerance; an `output/` array the json does not list and an `input/` array the
    checker never read mean the case asks for something the checker does not do (debug arrays are
    aids: compared where listed)."""
    listed = case.meta["arrays"]
    unchecked = sorted(set(case.output_names()) - set(computed))
    assert not unchecked, f"{case.name}: outputs no checker produces: {unchecked}"
    unlisted = sorted(n for n in computed if n not in listed and not n.startswith("debug/"))
    assert not unlisted, f"{case.name}: produced arrays the json does not list: {unlisted}"
    unread = sorted(n for n in case.arrays if n.startswith("input/") and n not in case.read)
    assert not unread, f"{case.name}: inputs the checker never used: {unread}"
    tolerances = case.meta.get("tolerances", {})
    for name, actual in computed.items():
        if name not in listed:
            continue  # an unlisted debug tap
        expected, actual = case[name], actual.detach()
        if not expected.is_floating_point():
            assert actual.dtype == expected.dtype, f"{case.name}: {name}: dtype {actual.dtype}"
            assert torch.equal(actual, expected), f"{case.name}: {name} differs"
            continue
        tol = tolerances.get(name)
        assert tol is not None, f"{case.name}: no tolerance for float output {name}"
        torch.testing.assert_close(
            actual.to(expected.dtype), expected, rtol=tol["rtol"], atol=tol["atol"],
            msg=lambda m, name=name: f"{case.name}: {name}: {m}",
        )  # fmt: skip


@pytest.mark.golden
@pytest.mark.parametrize("path", _case_paths(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    problem = golden_problem(path.parent)
    if problem is not None:
        pytest.fail(problem)
    case = Case.load(path)
    kind = case.meta["kind"]
    if kind not in CHECKERS:
        pytest.fail(f"unknown golden kind {kind!r} in {path.name}")
    torch.manual_seed(0)
    verify(case, CHECKERS[kind](case))
