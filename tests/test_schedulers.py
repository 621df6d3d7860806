import inspect
import itertools

import diffusers
import diffusers.schedulers.scheduling_lms_discrete as diffusers_lms
import numpy as np
import pytest
import torch

from sd_core.schedulers import (DDIM, DDPM, DIFFUSERS_CLASS_NAMES, DISPLAY_NAMES, SCHEDULER_NAMES, SCHEDULERS,
                                make_scheduler,
                                predicted_x0_and_eps)

REFERENCE = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "dpmpp_2m_sde": diffusers.DPMSolverMultistepScheduler,
    "pndm": diffusers.PNDMScheduler,
    "lms": diffusers_lms.LMSDiscreteScheduler,  # the real class (diffusers exports a stub without scipy)
    "heun": diffusers.HeunDiscreteScheduler,
    "unipc": diffusers.UniPCMultistepScheduler,
    "lcm": diffusers.LCMScheduler,
}
# What a name fixes in the reference's config (sd_core's variant names, PNDM as SD folders configure it).
REFERENCE_CONFIG = {"dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++"}, "pndm": {"skip_prk_steps": True}}
KARRAS = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "lms", "heun", "unipc")  # samplers with Karras sigmas
DRAW_NO_NOISE = ("ddim", "euler", "dpmpp_2m", "pndm", "lms", "heun", "unipc")


class GaussLegendreQuad:
    """Stands in for scipy.integrate where scipy is absent (diffusers' LMS integrates with quad): 8-point
    Gauss-Legendre, exact for the cubic Lagrange polynomials LMS integrates, evaluating diffusers' own integrand."""
    @staticmethod
    def quad(f, a, b, epsrel=None):
        nodes, weights = np.polynomial.legendre.leggauss(8)
        a, b = float(a), float(b)
        return (b - a) / 2 * sum(w * float(f((b - a) / 2 * x + (a + b) / 2)) for x, w in zip(nodes, weights)), 0.0


@pytest.fixture(autouse=True)
def lms_reference_can_integrate(monkeypatch):
    """diffusers' LMS module has no `integrate` without scipy: this module's tests then get the stand-in, undone after
    each test so no other module sees a patched diffusers."""
    if not hasattr(diffusers_lms, "integrate"):
        monkeypatch.setattr(diffusers_lms, "integrate", GaussLegendreQuad, raising=False)


STEP_COUNTS = [1, 2, 7, 25, 30, 50, 1000]
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# Stable Diffusion 1.5's scheduler_config.json (written for PNDM): every sampler must accept it.
SD15_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                         "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                         "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                         "clip_sample": False}


def pair(name: str, options=None, **config):
    reference = REFERENCE[name].from_config({**REFERENCE_CONFIG.get(name, {}), **config})
    ours = make_scheduler(name, dict(reference.config), **(options or {}))
    return ours, reference


SCHEDULE_CASES = [(name, spacing, offset, karras)
                  for name, spacing, offset, karras in itertools.product(
                      REFERENCE, ["leading", "trailing", "linspace"], [0, 1], [False, True])
                  if not karras or name in KARRAS]


@pytest.mark.parametrize("name,spacing,offset,karras", SCHEDULE_CASES)
def test_timesteps_and_sigmas_equal_diffusers(name, spacing, offset, karras):
    ours, reference = pair(name, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras, **SD_BETAS)
    for n in STEP_COUNTS:
        if name == "lcm" and n > 50:
            with pytest.raises(ValueError, match="too many"):
                ours.set_timesteps(n)
            with pytest.raises(ValueError):
                reference.set_timesteps(n)
            continue
        reference.set_timesteps(n)
        if name in ("ddpm", "ddim", "pndm") and reference.timesteps.max() >= 1000:
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
        start = (steps - min(int(steps * strength), steps)) * reference.order
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
    if not (name in ("euler_ancestral", "pndm") and prediction == "sample")  # diffusers raises for these
    for extra in ([{}] + ([{"use_karras_sigmas": True}] if name in KARRAS else [])
                  + ([{"timestep_spacing": "trailing", "steps_offset": 1}] if name != "ddpm" else [])
                  + ([{"solver_type": "heun", "lower_order_final": False}] if name.startswith("dpmpp") else [])
                  + ([{"skip_prk_steps": False}] if name == "pndm" else [])
                  + ([{"clip_sample": True, "clip_sample_range": 0.5}] if name == "heun" else [])
                  + ([{"clip_sample": True, "set_alpha_to_one": False}] if name == "ddim" else [])
                  + ([{"variance_type": "fixed_large"}] if name == "ddpm" else [])
                  # UniPC-3 (the rho solve), B(h) = h, no lower-order last step (to sigma_min: to 0 it is inf in
                  # both), skipped correctors, Karras sigmas ending at their own sigma_min.
                  + ([{"solver_order": 3}, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
                      {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, {"disable_corrector": [0, 4]},
                      {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}] if name == "unipc" else [])
                  # LCM: another distillation grid, x0 clipping, alpha_bar_0 after the last listed step.
                  # (c_skip is below 1e-5 for t >= 19 at timestep_scaling 10: 0.01 makes it matter.)
                  + ([{"original_inference_steps": 40, "timestep_scaling": 5.0}, {"timestep_scaling": 0.01},
                      {"clip_sample": True, "clip_sample_range": 0.5}] if name == "lcm" else []))
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
        make_scheduler("dpm_fast")


@pytest.mark.parametrize("spacing,offset", itertools.product(["leading", "trailing", "linspace"], [0, 1]))
def test_pndm_runge_kutta_schedule_equals_diffusers(spacing, offset):
    ours, reference = pair("pndm", skip_prk_steps=False, timestep_spacing=spacing, steps_offset=offset, **SD_BETAS)
    for n in [4, 5, 7, 25, 50]:
        reference.set_timesteps(n)
        assert torch.equal(ours.set_timesteps(n).timesteps, reference.timesteps), n
    with pytest.raises(ValueError, match="needs at least 4 steps"):
        ours.set_timesteps(3)
    with pytest.raises(ValueError, match="runs from the first step only"):
        ours.set_timesteps(10, 0.5)


def test_sd_folders_run_pndm_as_plms_by_default():
    assert DIFFUSERS_CLASS_NAMES[SD15_SCHEDULER_CONFIG["_class_name"]] == "pndm" and DISPLAY_NAMES["pndm"] == "PLMS"
    ours = make_scheduler("pndm", SD15_SCHEDULER_CONFIG)
    assert ours.config.skip_prk_steps and not ours.config.set_alpha_to_one
    state = ours.set_timesteps(4)  # PLMS: the second timestep twice, the first step is redone from x_T
    assert state.timesteps.tolist() == [751, 501, 501, 251, 1]
    with pytest.raises(ValueError, match="prediction_type 'epsilon' or 'v_prediction'"):
        make_scheduler("pndm", {**SD15_SCHEDULER_CONFIG, "prediction_type": "sample"})


# SD-Turbo's and SDXL-Turbo's scheduler_config.json: Euler ancestral, trailing spacing, 1-4 steps.
TURBO_SCHEDULER_CONFIGS = {
    "sd-turbo": {"_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.24.0.dev0",
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                 "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                 "timestep_spacing": "trailing", "trained_betas": None},
    "sdxl-turbo": {"_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.24.0.dev0",
                   "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                   "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                   "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                   "timestep_spacing": "trailing", "trained_betas": None, "use_karras_sigmas": False},
}


@pytest.mark.parametrize("model,steps", itertools.product(TURBO_SCHEDULER_CONFIGS, [1, 4]))
def test_turbo_euler_ancestral_trailing_equals_diffusers(model, steps):
    config = TURBO_SCHEDULER_CONFIGS[model]
    assert DIFFUSERS_CLASS_NAMES[config["_class_name"]] == "euler_ancestral"
    reference = diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    ours = make_scheduler("euler_ancestral", config)
    reference.set_timesteps(steps)
    state = ours.set_timesteps(steps)
    assert torch.equal(state.timesteps, reference.timesteps) and torch.equal(state.sigmas, reference.sigmas)
    assert state.timesteps[0] == 999 and torch.equal(torch.as_tensor(state.init_noise_sigma), reference.init_noise_sigma)
    model_fn = synthetic_model(4, 4)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    expected = run_reference(reference, model_fn, noise, steps, torch.Generator().manual_seed(8))
    got = run_ours(ours, model_fn, noise, steps, torch.Generator().manual_seed(8))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_2m_sde_karras"])
def test_stochastic_samplers_draw_their_noise_from_the_generator_only(name):
    ours = make_scheduler(name, SD_BETAS)
    model = synthetic_model(4, 4)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = run_ours(ours, model, noise, 6, torch.Generator().manual_seed(3))
    torch.manual_seed(2)  # the global RNG plays no part
    assert torch.equal(run_ours(ours, model, noise, 6, torch.Generator().manual_seed(3)), first)
    assert not torch.allclose(run_ours(ours, model, noise, 6, torch.Generator().manual_seed(4)), first, atol=1e-3)


def test_lms_coefficients_integrate_the_lagrange_basis_exactly():
    from sd_core.schedulers.euler import lagrange_integrals
    points, start, end = [1.5, 2.5, 4.0, 7.0], 1.5, 0.9
    got = lagrange_integrals(points, start, end)
    # The basis sums to 1 and reproduces sigma^k: its integrals give those of 1, sigma, sigma^2, sigma^3.
    for k in range(4):
        exact = (end ** (k + 1) - start ** (k + 1)) / (k + 1)
        assert sum(c * p ** k for c, p in zip(got, points)) == pytest.approx(exact, rel=1e-12)
    assert lagrange_integrals([3.0], 3.0, 2.0) == [-1.0]  # order 1 is Euler


def test_lms_equals_diffusers_with_scipy_quad_where_scipy_is_installed(monkeypatch):
    """diffusers' own coefficients (scipy.integrate.quad, epsrel 1e-4, float32 integrand) against the exact ones:
    measured at most 8.8e-6 of the output's scale over every spacing/offset/prediction/Karras, 1-50 steps."""
    monkeypatch.setattr(diffusers_lms, "integrate", pytest.importorskip("scipy.integrate"), raising=False)
    ours, reference = pair("lms", **SD_BETAS)
    model = synthetic_model(4, 4)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    expected = run_reference(reference, model, noise, 25, None)
    got = run_ours(ours, model, noise, 25, None)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("karras", [False, True])
def test_unipc_sigma_min_schedule_equals_diffusers(karras):
    """With Karras sigmas UniPC ends at the last Karras sigma (DPM-Solver++ at the smallest training sigma)."""
    ours, reference = pair("unipc", final_sigmas_type="sigma_min", use_karras_sigmas=karras, **SD_BETAS)
    for n in [1, 5, 20]:
        reference.set_timesteps(n)
        state = ours.set_timesteps(n)
        assert torch.equal(state.timesteps, reference.timesteps) and torch.equal(state.sigmas, reference.sigmas)


def test_unipc_takes_a_dpm_solver_config_as_diffusers_does():
    config = {**SD_BETAS, "solver_type": "midpoint", "algorithm_type": "dpmsolver++"}
    assert make_scheduler("unipc", config).config.solver_type == "bh2"
    assert diffusers.UniPCMultistepScheduler.from_config(config).config.solver_type == "bh2"
    with pytest.raises(ValueError, match="predict_x0=True"):
        make_scheduler("unipc", {"predict_x0": False})


def test_unipc_bh1_last_step_to_sigma_zero_gives_x0_where_diffusers_gives_nan():
    """diffusers multiplies B(h) = -h = -inf by a zero correction on the first-order last step; the step is
    DPM-Solver++(1), whose result at sigma = 0 is the x0 estimate, finite (bh2 gives the same in both)."""
    ours, reference = pair("unipc", solver_type="bh1", **SD_BETAS)
    model = synthetic_model(4, 4)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    assert run_reference(reference, model, noise, 12, None).isnan().all()
    got = run_ours(ours, model, noise, 12, None)
    bh2 = run_ours(make_scheduler("unipc", SD_BETAS), model, noise, 12, None)
    assert torch.isfinite(got).all() and not torch.equal(got, bh2)  # bh1 and bh2 differ before the last step


def test_dpm_solver_takes_a_unipc_config_as_diffusers_does():
    config = {**SD_BETAS, "solver_type": "bh2", "predict_x0": True, "disable_corrector": []}
    assert make_scheduler("dpmpp_2m", config).config.solver_type == "midpoint"
    assert diffusers.DPMSolverMultistepScheduler.from_config(config).config.solver_type == "midpoint"


@pytest.mark.parametrize("original", [50, 40, 7, 1000])
def test_lcm_steps_come_from_the_original_grid_like_diffusers(original):
    ours, reference = pair("lcm", original_inference_steps=original)
    for n in range(1, 9):
        if n > original:
            with pytest.raises(ValueError, match="too many"):
                ours.set_timesteps(n)
            continue
        reference.set_timesteps(n)
        assert torch.equal(ours.set_timesteps(n).timesteps, reference.timesteps), n
    assert ours.set_timesteps(4).timesteps.tolist() == {50: [999, 759, 499, 259], 40: [999, 749, 499, 249],
                                                        7: [993, 851, 567, 283], 1000: [999, 749, 499, 249]}[original]


def test_lcm_is_the_consistency_estimate_on_one_step_and_draws_noise_only_between_steps():
    ours = make_scheduler("lcm", {"clip_sample": False})
    model = synthetic_model(4, 4)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    state = ours.set_timesteps(1)
    out = ours.step(state, model(noise, 999), noise, generator)
    assert torch.equal(generator.get_state(), before)  # the last step adds no noise
    x0 = (noise - (1 - ours.alphas_cumprod[999]).sqrt() * model(noise, 999)) / ours.alphas_cumprod[999].sqrt()
    s = 9990.0  # timestep_scaling t: c_skip ~ 2.5e-9, c_out ~ 1 - 1.3e-9, so f(x, t) is x0 up to float32
    assert torch.allclose(out.prev_sample, 0.25 / (s ** 2 + 0.25) * noise + s / (s ** 2 + 0.25) ** 0.5 * x0)
    assert torch.equal(out.prev_sample, out.pred_original_sample)
    first = run_ours(ours, model, noise, 4, torch.Generator().manual_seed(3))
    assert not torch.allclose(run_ours(ours, model, noise, 4, torch.Generator().manual_seed(4)), first, atol=1e-3)


@pytest.mark.parametrize("name", ["unipc", "lcm"])
def test_a_folder_naming_the_diffusers_class_runs_the_sampler(name):
    """The scheduler_config.json diffusers writes for the class (every field it has) picks and configures ours."""
    import json
    written = json.loads(REFERENCE[name].from_config(SD15_SCHEDULER_CONFIG).to_json_string())
    assert DIFFUSERS_CLASS_NAMES[written["_class_name"]] == name and DISPLAY_NAMES[name] in ("UniPC", "LCM")
    ours, reference = make_scheduler(name, written), REFERENCE[name].from_config(written)
    reference.set_timesteps(4)
    assert torch.equal(ours.set_timesteps(4).timesteps, reference.timesteps)


def test_lcm_boundary_scalings_make_the_consistency_function_the_identity_at_t0():
    from sd_core.schedulers.lcm import consistency_boundary_scalings
    assert consistency_boundary_scalings(torch.tensor(0), 10.0) == (1.0, 0.0)  # f(x, 0) = x
    c_skip, c_out = consistency_boundary_scalings(torch.tensor(1), 10.0)  # s = 10
    assert c_skip.item() == pytest.approx(0.25 / 100.25) and c_out.item() == pytest.approx(10 / 100.25 ** 0.5)
    reference = diffusers.LCMScheduler(timestep_scaling=0.01)
    for t in (0, 19, 259, 999):
        expected = reference.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert consistency_boundary_scalings(torch.tensor(t), 0.01) == expected


def test_a_sampler_is_registered_by_listing_its_class_once():
    """Each sampler class names itself three ways (sd_core, diffusers, A1111); the registries derive from
    schedulers.SAMPLERS, so none of them can miss a sampler or disagree with another."""
    from sd_core.schedulers import DISPLAY_NAMES, SAMPLERS
    for cls in SAMPLERS:
        assert cls.name and cls.diffusers_class.endswith("Scheduler") and cls.display_name, cls
        assert SCHEDULERS[cls.name] is cls and DIFFUSERS_CLASS_NAMES[cls.diffusers_class] == cls.name
        assert hasattr(diffusers, cls.diffusers_class), cls.diffusers_class
    assert len(set(DISPLAY_NAMES.values())) == len(DISPLAY_NAMES) == len(SCHEDULER_NAMES)
