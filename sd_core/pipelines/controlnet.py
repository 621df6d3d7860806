"""ControlNets in a sampling run, as diffusers' StableDiffusion(XL)ControlNet(Img2Img, Inpaint)Pipeline use them.

The record names each ControlNet with its preprocessor, scale and window (`GenerationSettings.controlnets`); the
loaded models and their images come beside it, one (model, image) pair per entry:

    settings = GenerationSettings(prompt="a house", controlnets=[("canny-sd15", "canny", 1.0, 0.0, 0.8)])
    generate(pipe, settings, control=[(load_controlnet("path/to/canny-sd15"), "house.png")])

At each step, every ControlNet whose window holds the step turns the UNet's input, the text conditioning and its
control image into residuals for the UNet's skips and mid block (`Control.residuals`), times its scale; several
ControlNets' residuals add up (diffusers' MultiControlNetModel). In guess mode a ControlNet sees only the
prompt's half of the guidance batch and the negative prompt's half gets zero residuals, so the control steers
the image without being pushed against by the negative prompt.

The output size is the record's (or the model's, or the start image's), never the control image's: a control
image of another size is stretched to it as diffusers stretches it (diffusers' text to image without a size
takes the control image's instead).
"""
import dataclasses
import warnings

import torch

from sd_core.models.controlnet import ControlNetModel
from sd_core.models.unet import UNet2DConditionModel
from sd_core.pipelines.control_images import control_batch, control_image_to_tensor, preprocess_control_image
from sd_core.pipelines.image_io import open_image
from sd_core.pipelines.offload import execution_device
from sd_core.pipelines.settings import GenerationSettings

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def acts_at(step: int, steps: int, start: float, end: float) -> bool:
    """diffusers' `controlnet_keep`: a ControlNet acts at step i of n when its window holds the whole step,
    i / n >= start and (i + 1) / n <= end (n counts the steps the run makes, after an image's strength)."""
    return not (step / steps < start or (step + 1) / steps > end)


def step_scale(scale: float, step: int, steps: int, start: float, end: float) -> float:
    """The scale a ControlNet's residuals get at a step: its own inside its window, 0 outside (diffusers multiplies
    the scale by a keep of 1.0 or 0.0)."""
    return scale * float(acts_at(step, steps, start, end))


@dataclasses.dataclass
class ControlUnit:
    """One ControlNet as a run uses it."""
    model: ControlNetModel
    hint: torch.Tensor  # the batch's control images in [0, 1] at the output size, doubled for guidance unless guess mode
    scale: float
    start: float
    end: float


@dataclasses.dataclass
class Control:
    """The ControlNets of one run, for a schedule of `steps` steps."""
    units: list
    steps: int
    guided: bool
    guess_mode: bool

    def residuals(self, model_input: torch.Tensor, t, step: int, embeddings: torch.Tensor, added: dict | None) -> dict:
        """The UNet's keyword arguments at step `step` for `model_input` (the scaled latents, not doubled for
        guidance; an inpainting UNet's extra channels not added): the summed residuals of the ControlNets acting
        now, or nothing when none does. A ControlNet outside its window is not run: its residuals would be
        zeros, and adding zeros changes no value, so skipping it gives diffusers' numbers."""
        acting = [(unit, step_scale(unit.scale, step, self.steps, unit.start, unit.end)) for unit in self.units]
        acting = [(unit, scale) for unit, scale in acting if scale != 0]
        if not acting:
            return {}
        sample, context, conditions = self.inputs(model_input, embeddings, added)
        down, mid = None, None
        for unit, scale in acting:
            unit_down, unit_mid = unit.model(sample, t, context, unit.hint, conditioning_scale=scale,
                                             added_cond_kwargs=conditions, guess_mode=self.guess_mode)
            down = unit_down if down is None else [a + b for a, b in zip(down, unit_down)]
            mid = unit_mid if mid is None else mid + unit_mid
        if self.guess_mode and self.guided:  # the negative prompt's half: zero residuals
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def inputs(self, model_input, embeddings, added):
        """What the ControlNets see: the guidance batch, or in guess mode its prompt half alone."""
        if not self.guided:
            return model_input, embeddings, added
        if self.guess_mode:
            half = None if added is None else {key: value.chunk(2)[1] for key, value in added.items()}
            return model_input, embeddings.chunk(2)[1], half
        return torch.cat([model_input] * 2), embeddings, added


def warn_about_depth_and_transparency(image, index: int):
    """Say what happens to a 16-bit or transparent control image, and how to avoid it."""
    if image.mode in SIXTEEN_BIT_MODES:
        warnings.warn(f"Control image {index} is {image.mode} (16-bit or float); it is scaled to 8 bits, all a "
                      f"ControlNet takes (diffusers would clip it instead). Save it as 8-bit to choose the scaling "
                      f"yourself.", stacklevel=4)
    if image.has_transparency_data and image.convert("RGBA").getchannel("A").getextrema()[0] < 255:
        warnings.warn(f"Control image {index} is transparent; its transparent pixels are read as white. Flatten it "
                      f"onto the background you mean (black for an edge map), or use the invert preprocessor for "
                      f"dark lines drawn on a transparent layer.", stacklevel=4)


def control_hint(image, preprocessor: str, index: int, size: tuple[int, int], multiple: int) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] at the output size: the image read within the image reader's bounds, preprocessed,
    stretched as diffusers does (with a warning when its aspect ratio differs). "none" keeps the image's own mode
    for resizing, so a palette image is resampled by nearest neighbour as diffusers does."""
    images = image if isinstance(image, (list, tuple)) else [image]
    opened = [open_image(one, convert=lambda decoded: decoded) for one in images]
    for one in opened:
        warn_about_depth_and_transparency(one, index)
    if preprocessor != "none":
        opened = [preprocess_control_image(one, preprocessor) for one in opened]
    return control_image_to_tensor(opened, width=size[1], height=size[0], multiple=multiple)


def prepare_control(pipe, s: GenerationSettings, control, prompts: int, size: tuple[int, int], guided: bool,
                    steps: int) -> Control | None:
    """The run's ControlNets from the record's entries and `control`, one (ControlNetModel, image) pair per entry
    (the image: a path, file or PIL image, or one per prompt): each checked against the UNet before any step,
    its image made into the batch's hint. None for a run without ControlNets."""
    control = list(control or ())
    if len(control) != len(s.controlnets):
        raise ValueError(f"The settings name {len(s.controlnets)} ControlNet(s) but {len(control)} were given: pass "
                         f"control=[(ControlNetModel, image), ...], one pair per settings.controlnets entry.")
    if control and not isinstance(pipe.unet, UNet2DConditionModel):
        raise ValueError(f"ControlNets add their residuals to sd_core's UNet; this pipeline's denoiser is a "
                         f"{type(pipe.unet).__name__} (the fast path). Generate with the plain pipeline.")
    for index, (model, _) in enumerate(control):
        if not isinstance(model, ControlNetModel):
            raise TypeError(f"control[{index}] must pair a ControlNetModel (sd_core.checkpoints.controlnet."
                            f"load_controlnet) with its image; got {type(model).__name__}.")
        model.check_fits(pipe.unet)
    if not control:
        return None
    guess_mode = s.guess_mode or control[0][0].config.global_pool_conditions  # diffusers reads the first's
    units = []
    for index, ((model, image), (_, preprocessor, scale, start, end)) in enumerate(zip(control, s.controlnets)):
        hint = control_hint(image, preprocessor, index, size, pipe.vae_scale_factor)
        hint = control_batch(hint, prompts, s.images_per_prompt, guided, guess_mode,
                             device=execution_device(model), dtype=next(model.parameters()).dtype)
        units.append(ControlUnit(model, hint, scale, start, end))
    return Control(units, steps, guided, guess_mode)
