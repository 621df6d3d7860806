"""The components of a Stable Diffusion or DiT model, as the loaders build them and the pipelines use them."""
import dataclasses

from sd_core.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sd_core.models.dit import DiTTransformer2DModel
from sd_core.checkpoints.families import FAMILIES, Family
from sd_core.tokenizer import CLIPTokenizer
from sd_core.models.unet import UNet2DConditionModel
from sd_core.models.vae import AutoencoderKL


class Components:
    """What both kinds of pipeline answer: their family's record, and their models by component name."""
    family: str
    model_names: tuple = ()

    @property
    def traits(self) -> Family:
        """What this model family does differently (text encoding, defaults, file layout)."""
        return FAMILIES[self.family]

    @property
    def models(self) -> dict:
        return {name: getattr(self, name) for name in self.model_names if getattr(self, name) is not None}


@dataclasses.dataclass
class StableDiffusionPipeline(Components):
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
    model_names = ("unet", "vae", "text_encoder", "text_encoder_2")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return (self.unet.config.sample_size or 64) * self.vae_scale_factor


@dataclasses.dataclass
class DiTPipeline(Components):
    """Class-conditional DiT on the SD VAE's latents; `id2label` names the classes."""
    transformer: DiTTransformer2DModel
    vae: AutoencoderKL
    scheduler_config: dict
    id2label: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    family: str = "dit"
    model_names = ("transformer", "vae")
