"""Parity in half precision on the device at hand (a GPU when one is lent; the CPU runs it too, slowly):

    python -m compare gpu-parity                          # SD 1.5, SDXL and DiT-XL/2, fp16 and bf16, real size
    python -m compare gpu-parity --configs sd15 --dtypes fp16 --latent 64

Real-size random weights (diffusers' init, shared with sd_core without a copy). For each config and half dtype:
one denoiser step of sd_core and of diffusers in that dtype on the same inputs, each against sd_core's fp32 output
(cosine distance 1 - cos, max |difference|), and the two half-precision outputs against each other. For SD 1.5 also
the whole pipeline (4 DPM++ 2M steps with CFG): the final latents' cosine distance and the decoded images' largest
8-bit difference, sd_core against diffusers in the same dtype. The figures to read: sd_core's distance from fp32
should be no larger than diffusers' (both round the same operations), and the 8-bit images should match within a few
levels. A measurement, not a test; `compare/gpu-check.sh` runs it with the benchmark.
"""
import copy
import dataclasses

import torch

from sd_core.models import presets
from sd_core.models.dit import DiTTransformer2DModel, dit_config
from sd_core.models.unet import UNet2DConditionModel

from .benchmark import unet_inputs
from .pipeline_pairs import EMBEDDED_PROMPT, sd15_diffusers_pipeline, sd_core_twin
from .twins import twin
from .measure import DTYPES, device

CONTEXT_WIDTH = {"sd15": 768, "sdxl": 2048}
UNET_CONFIGS = {"sd15": presets.UNET_SD15, "sdxl": presets.UNET_SDXL_BASE}


@dataclasses.dataclass
class Agreement:
    config: str
    dtype: str
    what: str
    ours_vs_fp32: float  # cosine distance of sd_core's half-precision output from sd_core's fp32 one
    theirs_vs_fp32: float  # the same for diffusers
    ours_vs_theirs: float  # sd_core against diffusers, both in the half dtype
    max_difference: float  # largest |sd_core - diffusers| in the half dtype (8-bit levels for images)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(1 - torch.nn.functional.cosine_similarity(a, b, dim=0))


def step_models(config: str, latent: int):
    """(diffusers model, sd_core twin, the inputs of one step as a tuple, a call for each)."""
    import diffusers
    if config == "dit-xl-2":
        reference = diffusers.DiTTransformer2DModel(**dit_config("DiT-XL/2", image_size=latent * 8)).eval().to(device())
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, latent, latent, generator=generator).to(device())
        inputs = (x, torch.tensor([500, 500], device=device()), torch.tensor([207, 1000], device=device()))
        return (reference, twin(DiTTransformer2DModel, reference), inputs,
                lambda model, x, t, y: model(x, t, y).sample, lambda model, x, t, y: model(x, t, y))
    reference = diffusers.UNet2DConditionModel.from_config(UNET_CONFIGS[config]).eval().to(device())
    sample, context, added = unet_inputs(reference, torch.float32, latent, CONTEXT_WIDTH[config])
    inputs = (sample, torch.tensor(500, device=device()), context, added)
    return (reference, twin(UNet2DConditionModel, reference), inputs,
            lambda model, x, t, c, a: model(x, t, encoder_hidden_states=c, added_cond_kwargs=a).sample,
            lambda model, x, t, c, a: model(x, t, c, a))


def in_dtype(value, dtype):
    if isinstance(value, dict):
        return {key: in_dtype(v, dtype) for key, v in value.items()}
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


@torch.no_grad()
def step_agreement(config: str, dtypes: list[str], latent: int) -> list[Agreement]:
    reference, ours, inputs, call_theirs, call_ours = step_models(config, latent)
    exact = call_ours(ours, *inputs).float()
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        low_inputs = [in_dtype(value, dtype) for value in inputs]
        theirs_low = copy.deepcopy(reference).to(dtype)
        ours_low = twin(type(ours), theirs_low)
        a, b = call_ours(ours_low, *low_inputs).float(), call_theirs(theirs_low, *low_inputs).float()
        rows.append(Agreement(config, name, "denoiser step (batch 2)", cosine_distance(a, exact),
                              cosine_distance(b, exact), cosine_distance(a, b), float((a - b).abs().max())))
        del theirs_low, ours_low
    return rows


@torch.no_grad()
def sd15_pipeline_agreement(dtypes: list[str], latent: int, steps: int = 4) -> list[Agreement]:
    """The whole SD 1.5 pipeline in each half dtype: sd_core's and diffusers' final latents and 8-bit images."""
    import numpy as np

    from sd_core.pipelines.generate import text_to_image
    options = {"steps": steps, "seed": 0, "guidance_scale": 7.5, "height": latent * 8, "width": latent * 8,
               "scheduler": "dpmpp_2m"}
    rows = []
    theirs = sd15_diffusers_pipeline()
    exact = text_to_image(sd_core_twin(theirs), EMBEDDED_PROMPT, output_type="latent", **options).latents.float()
    for name in dtypes:
        theirs_low = copy.deepcopy(theirs).to(device(), DTYPES[name])
        ours_low = sd_core_twin(theirs_low)
        run_theirs = lambda output_type: theirs_low(
            EMBEDDED_PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=latent * 8, width=latent * 8,
            generator=torch.Generator().manual_seed(0), output_type=output_type).images
        a = text_to_image(ours_low, EMBEDDED_PROMPT, output_type="latent", **options).latents.float()
        b = run_theirs("latent").float()
        images = (np.asarray(text_to_image(ours_low, EMBEDDED_PROMPT, **options).images[0], np.int16),
                  np.asarray(run_theirs("pil")[0], np.int16))
        rows.append(Agreement("sd15", name, f"pipeline latents ({steps} steps), image levels", cosine_distance(a, exact),
                              cosine_distance(b, exact), cosine_distance(a, b), float(abs(images[0] - images[1]).max())))
    return rows


def main(args) -> int:
    dtypes = args.dtypes.split(",")
    rows = []
    for config in args.configs.split(","):
        rows += step_agreement(config, dtypes, args.latent)
        if config == "sd15":
            rows += sd15_pipeline_agreement(dtypes, args.latent)
        for row in rows[-len(dtypes) * (2 if config == "sd15" else 1):]:
            print(row, flush=True)
    print(f"\ndevice: {device()} ({torch.cuda.get_device_name() if device() == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}")
    print("| config | dtype | what | sd_core vs fp32 (1 - cos) | diffusers vs fp32 | sd_core vs diffusers | max diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.config} | {r.dtype} | {r.what} | {r.ours_vs_fp32:.2e} | {r.theirs_vs_fp32:.2e} | "
              f"{r.ours_vs_theirs:.2e} | {r.max_difference:.3g} |")
    return 0
