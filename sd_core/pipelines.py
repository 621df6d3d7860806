"""Pipelines: the components of a Stable Diffusion or DiT model, and the functions that generate with them."""
import dataclasses

from .clip import CLIPTextModel, CLIPTextModelWithProjection
from .dit import DiTTransformer2DModel
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")


@dataclasses.dataclass
class StableDiffusionPipeline:
    """SD 1.x / 2.x (one CLIP encoder), SDXL (CLIP-L + OpenCLIP bigG), SDXL refiner (bigG only)."""
    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict
    text_encoder: CLIPTextModel | None = None
    tokenizer: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    source: str = ""

    @property
    def models(self) -> dict:
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclasses.dataclass
class DiTPipeline:
    """Class-conditional DiT on the SD VAE's latents; `id2label` names the classes."""
    transformer: DiTTransformer2DModel
    vae: AutoencoderKL
    scheduler_config: dict
    id2label: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    family: str = "dit"

    @property
    def models(self) -> dict:
        return {"transformer": self.transformer, "vae": self.vae}
