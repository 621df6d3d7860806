"""Model families as data: what differs between SD 1.x, SD 2.x, SDXL, the SDXL refiner and DiT.

Every place that used to branch on a family's name reads its record instead: its denoiser (a UNet, or
DiT's transformer), how its text is encoded, its sampling defaults, the key that identifies its original
single-file checkpoints, the released architecture those files hold, and the diffusers pipeline class its
folders name. Adding a family is adding a record (and its tests).
"""
import dataclasses
from functools import partial
from typing import Callable

from sd_core.checkpoints import convert

from sd_core.models import presets


@dataclasses.dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: its component name, whether it has the text projection (pooled
    output), its tokenizer's pad token (None: the end-of-text token; "!": id 0, OpenCLIP's), and for
    original single files its released config and the rules that convert its keys."""
    component: str
    projected: bool
    pad_token: str | None
    preset: dict
    rules: Callable[[], convert.Rules]

    @property
    def tokenizer(self) -> str:
        return self.component.replace("text_encoder", "tokenizer")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    description: str
    diffusers_pipeline: str  # the pipeline class its diffusers folders name
    text_encoders: tuple[TextEncoderSlot, ...] = ()  # their hidden states are concatenated in this order
    # Its denoising model's component: "unet" (text-conditioned, a StableDiffusionPipeline), or "transformer" (DiT:
    # class-conditioned, a DiTPipeline; its original files hold the transformer alone, in the original code's layout).
    denoiser: str = "unet"
    # "last": the last hidden state after the final LayerNorm (SD1; SD2's config already stops one layer
    # early); "penultimate": the hidden states before the last layer (SDXL), plus the pooled projection.
    hidden_states: str = "last"
    zeros_for_empty_negative: bool = False  # SDXL's force_zeros_for_empty_prompt
    requires_aesthetics_score: bool = False  # the refiner's time ids carry an aesthetic score
    evidence: tuple[str, ...] = ()  # keys only this family's original checkpoints have
    unet: dict | None = None  # the released architecture, for original single files
    vae: dict = dataclasses.field(default_factory=lambda: presets.VAE_SD)
    scheduler: dict = dataclasses.field(default_factory=lambda: presets.SCHEDULER_SD)
    # Original files saved at one of these training steps are another released model, with its own scheduler.
    scheduler_by_step: dict = dataclasses.field(default_factory=dict)
    steps: int = 30  # recommended sampling settings
    guidance_scale: float = 7.5

    @property
    def pooled(self) -> bool:
        return any(slot.projected for slot in self.text_encoders)

    @property
    def xl(self) -> bool:
        """SDXL's pipeline layout (base and refiner): two tokenizer and text-encoder slots, present or not."""
        return self.hidden_states == "penultimate"

    @property
    def tokenizer_slots(self) -> tuple[str, ...]:
        return ("tokenizer", "tokenizer_2") if self.xl else ("tokenizer",)


CLIP_L = partial(TextEncoderSlot, projected=False, pad_token=None, preset=presets.CLIP_VIT_L)
OPENCLIP_BIGG = partial(TextEncoderSlot, projected=True, pad_token="!", preset=presets.OPENCLIP_VIT_BIGG)

FAMILIES = {family.name: family for family in [
    Family("sd1", "Stable Diffusion 1.x (CLIP ViT-L)", "StableDiffusionPipeline",
           (CLIP_L("text_encoder", rules=partial(convert.clip_rules, "cond_stage_model.transformer.")),),
           evidence=("cond_stage_model.transformer.text_model.final_layer_norm.weight",
                     "cond_stage_model.transformer.final_layer_norm.weight"),
           unet=presets.UNET_SD15),
    Family("sd2", "Stable Diffusion 2.x (OpenCLIP ViT-H)", "StableDiffusionPipeline",
           (TextEncoderSlot("text_encoder", False, "!", presets.OPENCLIP_VIT_H,
                            partial(convert.openclip_rules, "cond_stage_model.model.", projected=False)),),
           evidence=("cond_stage_model.model.ln_final.weight",), unet=presets.UNET_SD21,
           # as diffusers does, an SD2 file is the 768-v model unless its 875k steps say 2.x-base (epsilon prediction)
           scheduler=presets.SCHEDULER_SD2_V, scheduler_by_step={875000: presets.SCHEDULER_SD}),
    Family("sdxl", "Stable Diffusion XL base (CLIP ViT-L + OpenCLIP ViT-bigG)", "StableDiffusionXLPipeline",
           (CLIP_L("text_encoder", rules=partial(convert.clip_rules, "conditioner.embedders.0.transformer.")),
            OPENCLIP_BIGG("text_encoder_2",
                          rules=partial(convert.openclip_rules, "conditioner.embedders.1.model.", projected=True))),
           hidden_states="penultimate", zeros_for_empty_negative=True,
           evidence=("conditioner.embedders.1.model.ln_final.weight",), unet=presets.UNET_SDXL_BASE,
           vae=presets.VAE_SDXL, scheduler=presets.SCHEDULER_SDXL, guidance_scale=5.0),
    Family("sdxl_refiner", "Stable Diffusion XL refiner (OpenCLIP ViT-bigG)", "StableDiffusionXLImg2ImgPipeline",
           (OPENCLIP_BIGG("text_encoder_2",
                          rules=partial(convert.openclip_rules, "conditioner.embedders.0.model.", projected=True)),),
           hidden_states="penultimate", requires_aesthetics_score=True,
           evidence=("conditioner.embedders.0.model.ln_final.weight",), unet=presets.UNET_SDXL_REFINER,
           vae=presets.VAE_SDXL, scheduler=presets.SCHEDULER_SDXL, guidance_scale=5.0),
    Family("dit", "DiT (class-conditional transformer on SD VAE latents)", "DiTPipeline", denoiser="transformer",
           evidence=("y_embedder.embedding_table.weight",), scheduler=presets.SCHEDULER_DIT, steps=25,
           guidance_scale=4.0),
]}


def family_of_checkpoint(tensors: dict) -> tuple[Family, str]:
    """The family of an original single-file checkpoint, and the key that decided it."""
    for family in FAMILIES.values():
        for key in family.evidence:
            if key in tensors:
                return family, key
    keys = [key for family in FAMILIES.values() for key in family.evidence]
    raise convert.CheckpointError(
        f"Unknown checkpoint family: none of {keys} is present (the file has e.g. {convert.first_few(list(tensors), 4)})."
        f" sd_core loads SD 1.x/2.x/XL and DiT checkpoints; a UNet-only or LoRA file is not a whole model.")


def family_of_folder(pipeline_class: str, text_encoder_config, pad_token: str | None = None) -> Family:
    """The family of a diffusers folder from its pipeline class, its text encoder and tokenizer."""
    if pipeline_class == "DiTPipeline":
        return FAMILIES["dit"]
    if not pipeline_class.startswith("StableDiffusion"):
        raise convert.CheckpointError(f"pipeline {pipeline_class!r} is not one sd_core runs "
                                      f"(StableDiffusion*, StableDiffusionXL*, DiTPipeline).")
    if "XL" in pipeline_class:
        return FAMILIES["sdxl" if text_encoder_config is not None else "sdxl_refiner"]
    if text_encoder_config is None:
        raise convert.CheckpointError(f"a {pipeline_class} folder needs a text_encoder; this one has none.")
    # SD2's OpenCLIP ViT-H uses exact GELU and pads with "!"; anything else conditions the way SD1 does
    # (the last hidden state of one encoder), whatever its activation
    openclip = text_encoder_config.hidden_act == "gelu" and pad_token == "!"
    return FAMILIES["sd2" if openclip else "sd1"]
