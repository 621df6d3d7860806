"""What the comparison kinds share, those against diffusers (compare.kinds) and those against sd_core itself
(compare.self_kinds): which model family each kind takes, the pipeline as the parity policy compares it, each
family's settings, and the recorders, probe and stages of a run."""
import copy
import dataclasses
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sd_core.checkpoints.catalog import EMBEDDED_DIT_GUIDANCE, EMBEDDED_GUIDANCE
from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.generate import class_ids, scheduler_name
from sd_core.schedulers import VARIANTS

from .parity import REFERENCE_SCHEDULERS, compare_tensors, first_tensor

SD_KINDS, DIT_KINDS = ("text_to_image", "image_to_image", "vae", "controlnet"), ("dit", "dit_timestep_semantics")
DEFAULT_PROMPT = "a big red circle on the left on a gray background"


def load(model):
    """The sd_core pipeline, on the CPU in fp32 as the parity policy compares (a GPU or half-precision pipeline
    from the app is copied, never changed)."""
    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    first = next(next(iter(pipe.models.values())).parameters())
    if first.device.type != "cpu" or any(p.dtype != torch.float32 for m in pipe.models.values()
                                         for p in m.parameters()):
        pipe = cast_pipeline(pipe, torch.float32, "cpu")
    return pipe


def cast_pipeline(pipe, dtype, device):
    """A deep copy of the pipeline's models at `dtype` on `device` (the original stays as it is)."""
    return dataclasses.replace(pipe, **{name: copy.deepcopy(m).to(device=device, dtype=dtype)
                                        for name, m in pipe.models.items()})


def check_family(pipe, kind: str):
    if kind in DIT_KINDS and pipe.traits.denoiser != "transformer":
        raise ValueError(f"'{kind}' compares DiT models; {pipe.source or 'this model'} is {pipe.family}.")
    sd_only = ("text_to_image", "image_to_image", "controlnet", "fast_path")
    if kind in sd_only and pipe.traits.denoiser == "transformer":
        raise ValueError(f"'{kind}' compares Stable Diffusion models; use 'dit' for a DiT model.")


def image_stage_summary(stage) -> str:
    if stage.max_abs == 0:
        return "8-bit images identical"
    return (f"8-bit images differ by up to {stage.max_abs:.0f} levels in {stage.extra['differing_values']} of "
            f"{stage.extra['values']} values (PSNR {stage.extra['psnr_db']:.1f} dB)")


def sd_settings(pipe, prompt=DEFAULT_PROMPT, negative_prompt=None, seed=0, steps=10, scheduler=None,
                guidance_scale=EMBEDDED_GUIDANCE, height=None, width=None, image=None, strength=0.6, **unknown):
    if unknown:
        raise TypeError(f"Unknown settings for a Stable Diffusion comparison: {sorted(unknown)}.")
    return dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                scheduler=scheduler_name(pipe.scheduler_config, scheduler), guidance_scale=guidance_scale,
                height=height, width=width, image=image, strength=strength)


def dit_settings(pipe, class_labels=(0,), seed=0, steps=10, scheduler=None, guidance_scale=EMBEDDED_DIT_GUIDANCE,
                 guided_channels="all", **unknown):
    if unknown:
        raise TypeError(f"Unknown settings for a DiT comparison: {sorted(unknown)}.")
    labels = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
    return dict(class_labels=class_ids(pipe, labels), seed=seed, steps=steps,
                scheduler=scheduler_name(pipe.scheduler_config, scheduler), guidance_scale=guidance_scale,
                guided_channels=guided_channels)


class OutputRecorder:
    """Forward hook: the model's main output at every call."""

    def __init__(self, model):
        self.outputs = []
        self.handle = model.register_forward_hook(lambda m, a, out: self.outputs.append(first_tensor(out).detach()
                                                                                         .float().clone()))

    def remove(self):
        self.handle.remove()


def step_stages(predictions_a, predictions_b, latents_a, latents_b, tolerance) -> list:
    stages = [compare_tensors(f"step {i + 1} noise prediction", a, b, tolerance)
              for i, (a, b) in enumerate(zip(predictions_a, predictions_b))]
    return stages + [compare_tensors(f"step {i + 1} latents", a, b, tolerance)
                     for i, (a, b) in enumerate(zip(latents_a, latents_b))]


def dit_probe(pipe, labels: list, seed: int, dtype=torch.float32):
    """Inputs for the per-module check of a DiT: seeded latents at t=500, [class, null class]."""
    c = pipe.transformer.config
    sample = torch.randn((2, c.in_channels, c.sample_size, c.sample_size), generator=torch.Generator().manual_seed(seed))
    return sample.to(dtype), torch.tensor([500, 500]), torch.tensor([labels[0], c.null_class])


def default_image(size: int) -> Image.Image:
    """A deterministic picture to start from: a red disc and a blue square on gray."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse([size * 0.1, size * 0.2, size * 0.5, size * 0.6], fill=(220, 30, 30))
    draw.rectangle([size * 0.55, size * 0.45, size * 0.9, size * 0.8], fill=(30, 60, 220))
    return image


def parity_verdict(kind: str, stages: list, divergence: dict, extra: str = "") -> tuple[bool, str]:
    passed = all(s.passed for s in stages)
    failed = [s.name for s in stages if not s.passed]
    image = next((s for s in stages if s.name.startswith("decoded images")), None)
    first = (divergence or {}).get("first_divergent")
    text = f"{kind}: {'PASS' if passed else 'FAIL'} vs diffusers"
    text += f", {len(stages)} stages" + (f", first off: {failed[0]}" if failed else " within tolerance")
    if image is not None:
        text += "; " + image_stage_summary(image)
    if divergence:
        text += f"; first module over tolerance: {first['name'] if first else 'none'}"
    return passed, text + extra


def reference_scheduler(pipe, name: str):
    import diffusers
    sampler, overrides, _ = VARIANTS.get(name, (name, {}, None))
    return getattr(diffusers, REFERENCE_SCHEDULERS[sampler]).from_config(pipe.scheduler_config, **overrides)
