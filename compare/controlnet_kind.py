"""The `controlnet` kind: sd_core's ControlNet text to image beside diffusers' StableDiffusion(XL)ControlNetPipeline
on the same weights, noise, scheduler and control image.

    report = run_comparison("controlnet", "sd_core/weights/shapes-sd", controlnet="path/to/controlnet",
                            control_image="edges.png", preprocessor="none", conditioning_scale=0.8, control_end=0.6)

Stages: the control image as the ControlNet receives it, the text embeddings, then per step the ControlNet's mid
residual (at the steps its window holds), the UNet's noise prediction and the latents, and the 8-bit images; the
per-module check runs both ControlNets on step 1's inputs at t=500. Without a ControlNet given, the model's own
UNet encoder is copied into one (the paper's start of training) and its zero convolutions get seeded random
weights, so the comparison sees a ControlNet that acts.
"""
import math

import numpy as np
import torch
from PIL import Image

from sd_core.checkpoints.controlnet import load_controlnet
from sd_core.models.controlnet import ControlNetModel
from sd_core.pipelines.control_images import preprocess_control_image
from sd_core.pipelines.controlnet import acts_at
from sd_core.pipelines.generate import text_to_image

from .common import check_family, default_image, load, parity_verdict, reference_scheduler, sd_settings, step_stages
from .parity import (TOLERANCE, UNetRecorder, compare_images, compare_tensors, difference_caption, difference_map, first_divergence,
                     probe_conditioning, quiet_diffusers, reference_model, reference_pipeline)
from .report import Report, standard_plots

HINT_WIDTHS = (16, 32, 96, 256)  # the released ControlNets' hint encoder


@torch.no_grad()
def stand_in_controlnet(pipe, seed: int = 0) -> ControlNetModel:
    """A ControlNet copied from the model's UNet, its hint encoder as deep as the VAE's downscale, and its zero
    convolutions (which would make it add nothing) given seeded random weights of a small scale."""
    widths = HINT_WIDTHS[:int(math.log2(pipe.vae_scale_factor)) + 1]
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=widths)
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                  controlnet.controlnet_mid_block]
    for conv in zero_convs:
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / math.sqrt(conv.weight[0].numel()))
        conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=generator))
    return controlnet.eval()


class ControlNetRecorder:
    """Forward hook on a ControlNet (either stack): the control image it was given first, its mid residual at
    every call."""

    def __init__(self, controlnet):
        self.hint, self.mids = None, []
        self.handle = controlnet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        if self.hint is None:
            self.hint = kwargs.get("controlnet_cond", args[3] if len(args) > 3 else None).detach().clone()
        self.mids.append(output[1].detach().float().clone())

    def remove(self):
        self.handle.remove()


def reference_controlnet_pipeline(pipe, reference_net):
    import diffusers
    if pipe.traits.requires_aesthetics_score:
        raise ValueError("The controlnet kind compares base models; diffusers has no ControlNet pipeline for an "
                         "SDXL refiner.")
    base = reference_pipeline(pipe)
    pipeline_class = (diffusers.StableDiffusionXLControlNetPipeline if pipe.traits.xl
                      else diffusers.StableDiffusionControlNetPipeline)
    with quiet_diffusers():
        reference = pipeline_class(**base.components, controlnet=reference_net)
    reference.set_progress_bar_config(disable=True)
    return reference


def run_both(pipe, controlnet, reference, hint_image, s: dict, unit: dict, guess_mode: bool):
    """(our result, our recorders, their images, their recorders), each run recording UNet and ControlNet calls and
    the latents after every step."""
    ours_unet, ours_net, ours_latents = UNetRecorder(pipe.unet), ControlNetRecorder(controlnet), []
    their_unet, their_net, their_latents = UNetRecorder(reference.unet), ControlNetRecorder(reference.controlnet), []

    def on_step_end(_, i, t, tensors):
        their_latents.append(tensors["latents"].clone())
        return {}
    try:
        result = text_to_image(pipe, s["prompt"], s["negative_prompt"], steps=s["steps"], scheduler=s["scheduler"],
                               guidance_scale=s["guidance_scale"], seed=s["seed"], height=s["height"], width=s["width"],
                               controlnets=[("controlnet", "none", unit["scale"], unit["start"], unit["end"])],
                               guess_mode=guess_mode, control=[(controlnet, hint_image)],
                               callback=lambda i, t, x, x0: ours_latents.append(x.clone()))
        theirs = reference(s["prompt"], image=hint_image, negative_prompt=s["negative_prompt"],
                           num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"], height=s["height"],
                           width=s["width"], controlnet_conditioning_scale=unit["scale"],
                           control_guidance_start=unit["start"], control_guidance_end=unit["end"], guess_mode=guess_mode,
                           generator=torch.Generator().manual_seed(s["seed"]), output_type="np",
                           callback_on_step_end=on_step_end).images
    finally:
        for recorder in (ours_unet, ours_net, their_unet, their_net):
            recorder.remove()
    return result, (ours_unet, ours_net, ours_latents), (theirs * 255).round().astype("uint8"), \
        (their_unet, their_net, their_latents)


def controlnet_stages(ours, theirs, steps: int, unit: dict) -> list:
    """The control image, the text embeddings, per step the ControlNet's mid residual where it acted (sd_core skips
    it outside its window, diffusers runs it at scale 0), the noise predictions and the latents."""
    (ours_unet, ours_net, ours_latents), (their_unet, their_net, their_latents) = ours, theirs
    stages = [compare_tensors("control image (ControlNet input)", ours_net.hint, their_net.hint),
              compare_tensors("text embeddings (UNet input)", ours_unet.context, their_unet.context)]
    acting = [i for i in range(steps) if acts_at(i, steps, unit["start"], unit["end"])]
    their_mids = [their_net.mids[i] for i in acting]
    stages += [compare_tensors(f"step {i + 1} ControlNet mid residual", a, b)
               for i, a, b in zip(acting, ours_net.mids, their_mids)]
    return stages + step_stages(ours_unet.outputs, their_unet.outputs, ours_latents, their_latents, TOLERANCE)


@torch.no_grad()
def controlnet_kind(model, controlnet=None, control_image=None, preprocessor: str = "canny",
                    conditioning_scale: float = 1.0, control_start: float = 0.0, control_end: float = 1.0,
                    guess_mode: bool = False, **settings) -> Report:
    pipe = load(model)
    check_family(pipe, "controlnet")
    s = sd_settings(pipe, **settings)
    s["height"], s["width"] = s["height"] or pipe.default_size, s["width"] or pipe.default_size
    net = stand_in_controlnet(pipe, s["seed"]) if controlnet is None else \
        load_controlnet(controlnet) if not isinstance(controlnet, ControlNetModel) else controlnet
    net.check_fits(pipe.unet)
    picture = default_image(max(s["height"], s["width"])).resize((s["width"], s["height"]))
    hint_image = preprocess_control_image(picture if control_image is None else control_image, preprocessor)
    reference = reference_controlnet_pipeline(pipe, reference_model(net))
    reference.scheduler = reference_scheduler(pipe, s["scheduler"])
    unit = {"scale": conditioning_scale, "start": control_start, "end": control_end}
    result, ours, their_images, theirs = run_both(pipe, net, reference, hint_image, s, unit, guess_mode)
    stages = controlnet_stages(ours, theirs, len(theirs[2]), unit)
    stages.append(compare_images(np.stack([np.asarray(im) for im in result.images]), their_images))
    hint, context = ours[1].hint, ours[0].context[-ours[1].hint.shape[0]:]
    f = pipe.vae_scale_factor
    sample = torch.randn((hint.shape[0], net.config.in_channels, s["height"] // f, s["width"] // f),
                         generator=torch.Generator().manual_seed(s["seed"]))
    added = probe_conditioning(pipe, hint.shape[0], s["height"], s["width"])
    t = torch.tensor(500)
    divergence = first_divergence(net, reference.controlnet, lambda: net(sample, t, context, hint, added_cond_kwargs=added),
                                  lambda: reference.controlnet(sample, t, context, hint, added_cond_kwargs=added))
    passed, verdict = parity_verdict("controlnet", stages, divergence)
    their_image = Image.fromarray(their_images[0])
    difference, gain = difference_map(result.images[0], their_image)
    images = {"control image": hint_image, "sd_core": result.images[0], "diffusers": their_image,
              difference_caption(gain): difference}
    report_settings = {"model": pipe.source, **{k: v for k, v in s.items() if k not in ("image", "strength")},
                       "controlnet": str(controlnet) if controlnet is not None else "stand-in (from the UNet)",
                       "preprocessor": preprocessor, **unit, "guess_mode": guess_mode}
    notes = [f"diffusers ran {type(reference).__name__} on sd_core's very tensors (shared, not copied).",
             "Per-module check: the ControlNet on step 1's text embeddings and control image, at t=500."]
    return Report("controlnet", report_settings, stages, verdict, passed, images,
                  standard_plots(stages, divergence, "ControlNet", TOLERANCE), divergence,
                  {"image_psnr_db": stages[-1].extra.get("psnr_db")}, notes)
