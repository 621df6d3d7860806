"""The models sd_core offers by name, each with the sampling settings it is meant to be used with:
the embedded ones (trained here, shipped in weights/) and a curated set of released checkpoints on the
Hugging Face Hub (offered where the hub is reachable)."""
import dataclasses
from pathlib import Path

WEIGHTS = Path(__file__).parents[1] / "weights"
EMBEDDED_TEXT_TO_IMAGE = WEIGHTS / "shapes-sd"  # the models sd_core trains and ships (python -m sd_core.training)
EMBEDDED_DIT = WEIGHTS / "shapes-dit"
EMBEDDED_CONTROLNET = WEIGHTS / "shapes-controlnet"  # outline -> shape, for EMBEDDED_TEXT_TO_IMAGE
EMBEDDED_CONTROLNETS = {EMBEDDED_CONTROLNET.name: EMBEDDED_CONTROLNET}  # by the name the app and the CLI take


@dataclasses.dataclass(frozen=True)
class CatalogModel:
    name: str  # what a user picks
    source: str  # a folder, or a hub repo id
    kind: str  # "text_to_image", "dit" or "sdxl_refiner" (offered only as Text to image's refiner)
    steps: int  # the recommended settings
    guidance_scale: float
    size: int  # height = width, in pixels
    scheduler: str | None = None  # None: the model's own scheduler config
    download_gb: float = 0.0  # what sd_core fetches for it (fp16 variant on a GPU, fp32 on a CPU)
    memory_gb: float = 0.0  # weights in memory, fp16
    note: str = ""

    def memory_needed_gb(self, bytes_per_parameter: int) -> float:
        """Memory the weights take at this precision (fp32: 4 bytes, fp16/bf16: 2)."""
        return self.memory_gb * bytes_per_parameter / 2


EMBEDDED = {model.name: model for model in [
    CatalogModel("embedded: shapes (text to image)", str(EMBEDDED_TEXT_TO_IMAGE), "text_to_image", steps=20,
                 guidance_scale=5.0, size=64, scheduler="dpmpp_2m",
                 note="trained here on captions like 'a big red circle on the left on a gray background'"),
    CatalogModel("embedded: shapes (DiT)", str(EMBEDDED_DIT), "dit", steps=20, guidance_scale=3.0, size=64,
                 scheduler="dpmpp_2m", note="18 classes: a colour and a shape, e.g. 'red circle'"),
]}
# Their sampling defaults: what the app and the CLI open with and what `python -m sd_core.training evaluate` scores.
EMBEDDED_STEPS = EMBEDDED["embedded: shapes (text to image)"].steps
EMBEDDED_GUIDANCE = EMBEDDED["embedded: shapes (text to image)"].guidance_scale
EMBEDDED_DIT_GUIDANCE = EMBEDDED["embedded: shapes (DiT)"].guidance_scale

# Released models with their model cards' recommended settings. Sizes are the components sd_core loads.
HUB = {model.name: model for model in [
    CatalogModel("Stable Diffusion 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "text_to_image", steps=25,
                 guidance_scale=7.5, size=512, download_gb=2.13, memory_gb=2.13),
    CatalogModel("Stable Diffusion 2.1 (768, v-prediction)", "stabilityai/stable-diffusion-2-1", "text_to_image",
                 steps=25, guidance_scale=7.5, size=768, download_gb=2.6, memory_gb=2.6),
    CatalogModel("SD-Turbo", "stabilityai/sd-turbo", "text_to_image", steps=1, guidance_scale=0.0, size=512,
                 download_gb=2.6, memory_gb=2.6, note="1-4 steps, no guidance"),
    CatalogModel("Stable Diffusion XL base 1.0", "stabilityai/stable-diffusion-xl-base-1.0", "text_to_image",
                 steps=30, guidance_scale=5.0, size=1024, download_gb=6.9, memory_gb=6.9),
    CatalogModel("SDXL-Turbo", "stabilityai/sdxl-turbo", "text_to_image", steps=1, guidance_scale=0.0, size=512,
                 download_gb=6.9, memory_gb=6.9, note="1-4 steps, no guidance"),
    CatalogModel("SDXL refiner 1.0", "stabilityai/stable-diffusion-xl-refiner-1.0", "sdxl_refiner", steps=40,
                 guidance_scale=5.0, size=1024, download_gb=6.1, memory_gb=6.1,
                 note="the last 20% of an SDXL base model's schedule (Text to image, Advanced: Refiner)"),
    CatalogModel("DiT-XL/2 256", "facebook/DiT-XL-2-256", "dit", steps=25, guidance_scale=4.0, size=256,
                 download_gb=1.5, memory_gb=1.5),
    CatalogModel("DiT-XL/2 512", "facebook/DiT-XL-2-512", "dit", steps=25, guidance_scale=4.0, size=512,
                 download_gb=1.5, memory_gb=1.5),
]}


def entry_for(name_or_source) -> CatalogModel | None:
    """The catalog's record for a model named by its catalog name, its hub id, or its folder (any spelling of
    the same path); None for a model the catalog does not list."""
    text = str(name_or_source)
    for model in [*EMBEDDED.values(), *HUB.values()]:
        if text in (model.name, model.source):
            return model
    path = Path(text)
    if path.exists():
        for model in EMBEDDED.values():
            if path.resolve() == Path(model.source).resolve():
                return model
    return None


def recommended(source, pipe) -> dict:
    """The sampling settings a model is meant to be used with: the catalog's for a model it lists, else its
    family's (the scheduler then stays the model's own)."""
    model = entry_for(source)
    if model:
        return dict(steps=model.steps, guidance_scale=model.guidance_scale, scheduler=model.scheduler)
    return dict(steps=pipe.traits.steps, guidance_scale=pipe.traits.guidance_scale, scheduler=None)
