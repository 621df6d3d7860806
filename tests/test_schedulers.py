import inspect
import itertools

import diffusers
import pytest
import torch

from sd_core.schedulers import DDIM, DDPM, SCHEDULERS, make_scheduler, predicted_x0_and_eps

REFERENCE = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}
STEP_COUNTS = [1, 2, 7, 25, 30, 50, 1000]
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# Stable Diffusion 1.5's scheduler_config.json (written for PNDM): every sampler must accept it.
SD15_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                         "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                         "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                         "clip_sample": False}


def pair(name: str, options=None, **config):
    reference = REFERENCE[name].from_config(config)
    ours = make_scheduler(name, dict(reference.config), **(options or {}))
    return ours, reference


SCHEDULE_CASES = [(name, spacing, offset, karras)
                  for name, spacing, offset, karras in itertools.product(
                      REFERENCE, ["leading", "trailing", "linspace"], [0, 1], [False, True])
                  if not karras or name in ("euler", "dpmpp_2m")]  # Karras sigmas exist for these two only


@pytest.mark.parametrize("name,spacing,offset,karras", SCHEDULE_CASES)
def test_timesteps_and_sigmas_equal_diffusers(name, spacing, offset, karras):
    ours, reference = pair(name, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras, **SD_BETAS)
    for n in STEP_COUNTS:
        reference.set_timesteps(n)
        if name in ("ddpm", "ddim") and reference.timesteps.max() >= 1000:
            with pytest.raises(ValueError, match="beyond the 1000 training timesteps"):
                ours.set_timesteps(n)
            continue
        state = ours.set_timesteps(n)
        assert state.timesteps.dtype == reference.timesteps.dtype, n
        assert torch.equal(state.timesteps, reference.timesteps), n
        if ours.uses_sigmas:
            assert torch.equal(state.sigmas, reference.sigmas), n
        assert torch.equal(torch.as_tensor(state.init_noise_sigma), torch.as_tensor(reference.init_noise_sigma))


def synthetic_model(channels: int, out_channels: int):
    """A fixed random linear map of the sample, modulated by t, so errors compound over the loop."""
    weight = torch.randn(out_channels, channels, generator=torch.Generator().manual_seed(11)) / channels ** 0.5

    def model(sample, t):
        return torch.einsum("oc,bchw->bohw", weight, sample) * (1 + float(t) / 1000)
    return model


def run_reference(reference, model, noise, steps, generator, strength=1.0, x0=None, **step_kwargs):
    reference.set_timesteps(steps)
    timesteps = reference.timesteps
    if x0 is None:
        x = noise * reference.init_noise_sigma
    else:
        start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[start:]
        if hasattr(reference, "set_begin_index"):
            reference.set_begin_index(start)
        x = reference.add_noise(x0, noise, timesteps[:1].repeat(noise.shape[0]))
    if "generator" in inspect.signature(reference.step).parameters:  # PNDM, LMS, Heun draw no noise
        step_kwargs["generator"] = generator
    for t in timesteps:
        x = reference.step(model(reference.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


def run_ours(ours, model, noise, steps, generator, strength=1.0, x0=None):
    state = ours.set_timesteps(steps, strength)
    x = noise * state.init_noise_sigma if x0 is None else ours.add_noise_at_start(state, x0, noise)
    for t in state.timesteps:
        x = ours.step(state, model(ours.scale_model_input(state, x), t), x, generator).prev_sample
    return x


LOOP_CASES = [
    (name, prediction, extra)
    for name, prediction in itertools.product(REFERENCE, ["epsilon", "v_prediction", "sample"])
    if not (name == "euler_ancestral" and prediction == "sample")  # diffusers raises NotImplementedError
    for extra in ([{}] + ([{"use_karras_sigmas": True}] if name in ("euler", "dpmpp_2m") else [])
                  + ([{"timestep_spacing": "trailing", "steps_offset": 1}] if name != "ddpm" else [])
                  + ([{"solver_type": "heun", "lower_order_final": False}] if name == "dpmpp_2m" else [])
                  + ([{"clip_sample": True, "set_alpha_to_one": False}] if name == "ddim" else [])
                  + ([{"variance_type": "fixed_large"}] if name == "ddpm" else []))
]


def case_id(case):
    name, prediction, extra = case
    return "-".join([name, prediction] + [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.parametrize("case", LOOP_CASES, ids=[case_id(c) for c in LOOP_CASES])
def test_sampling_loop_matches_diffusers(case):
    name, prediction, extra = case
    config = {"prediction_type": prediction, "clip_sample": False, **SD_BETAS, **extra}
    ours, reference = pair(name, **config)
    model = synthetic_model(4, 4)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    steps = 25 if name == "ddpm" else 12
    expected = run_reference(reference, model, noise, steps, torch.Generator().manual_seed(42))
    got = run_ours(ours, model, noise, steps, torch.Generator().manual_seed(42))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_eta_draws_noise_like_diffusers(eta):
    ours, reference = pair("ddim", {"eta": eta}, clip_sample=False, **SD_BETAS)
    model = synthetic_model(4, 4)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    expected = run_reference(reference, model, noise, 10, torch.Generator().manual_seed(3), eta=eta)
    got = run_ours(ours, model, noise, 10, torch.Generator().manual_seed(3))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_ddpm_learned_range_variance_matches_diffusers():
    ours, reference = pair("ddpm", variance_type="learned_range", clip_sample=False)
    model = synthetic_model(4, 8)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    bounded = lambda sample, t: torch.tanh(model(sample, t))  # noqa: E731 (variance output in [-1, 1])
    expected = run_reference(reference, bounded, noise, 50, torch.Generator().manual_seed(9))
    got = run_ours(ours, bounded, noise, 50, torch.Generator().manual_seed(9))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("name", REFERENCE)
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_image_to_image_start_and_loop_match_diffusers(name, strength):
    ours, reference = pair(name, clip_sample=False, **SD_BETAS)
    model = synthetic_model(4, 4)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 6, 5, generator=generator), torch.randn(2, 4, 6, 5, generator=generator)
    expected = run_reference(reference, model, noise, 20, torch.Generator().manual_seed(5), strength, x0)
    got = run_ours(ours, model, noise, 20, torch.Generator().manual_seed(5), strength, x0)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_sampler_accepts_the_sd15_pndm_config(name):
    ours, reference = make_scheduler(name, SD15_SCHEDULER_CONFIG), REFERENCE[name].from_config(SD15_SCHEDULER_CONFIG)
    reference.set_timesteps(30)
    assert torch.equal(ours.set_timesteps(30).timesteps, reference.timesteps)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_add_noise_then_exact_noise_reverse_step_recovers_x0(t):
    scheduler = DDIM.from_config({**SD_BETAS, "clip_sample": False})
    generator = torch.Generator().manual_seed(t)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    xt = scheduler.add_noise(x0, noise, t)
    alpha_bar = scheduler.alphas_cumprod[t]
    assert torch.allclose(xt, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
    step = DDPM.from_config({**SD_BETAS, "clip_sample": False}).sample_prev_timestep(xt, noise, t, generator=generator)
    assert torch.allclose(step.pred_original_sample, x0, atol=1e-3 * max(1.0, (1 / alpha_bar.sqrt()).item()))
    v = scheduler.velocity(x0, noise, t)
    x0_from_v, eps_from_v = predicted_x0_and_eps(v, xt, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), "v_prediction")
    assert torch.allclose(x0_from_v, x0, atol=1e-4) and torch.allclose(eps_from_v, noise, atol=1e-4)


def test_ddpm_step_at_t0_adds_no_noise_and_returns_the_x0_estimate():
    scheduler = DDPM.from_config({"clip_sample": False})
    generator = torch.Generator().manual_seed(0)
    xt, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    before = generator.get_state()
    step = scheduler.sample_prev_timestep(xt, eps, 0, generator=generator)
    assert torch.equal(generator.get_state(), before)
    assert torch.allclose(step.prev_sample, step.pred_original_sample, atol=1e-6)
    assert scheduler.posterior_variance(0, -1).item() == pytest.approx(1e-20)
    assert scheduler.posterior_variance(10, 9).item() < scheduler.betas[10].item()


@pytest.mark.parametrize("name", SCHEDULERS)
def test_bad_inputs_give_clear_errors(name):
    scheduler = make_scheduler(name)
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            scheduler.set_timesteps(steps)
    with pytest.raises(ValueError, match="exceeds the 1000 training timesteps"):
        scheduler.set_timesteps(1001)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
            scheduler.set_timesteps(10, strength)
    with pytest.raises(ValueError, match="leaves no step"):
        scheduler.set_timesteps(10, 0.05)
    with pytest.raises(ValueError, match="unknown beta_schedule 'cubic'"):
        make_scheduler(name, {"beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'"):
        make_scheduler(name, {"prediction_type": "noise"})
    with pytest.raises(ValueError, match="Unknown scheduler"):
        make_scheduler("heun")
