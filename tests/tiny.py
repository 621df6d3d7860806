"""Small seeded diffusers/transformers pipelines for the loading and pipeline tests (no downloads)."""
import functools
import json
import tempfile

import diffusers
import transformers

from sd_core.tokenizer import CLIPTokenizer
from tests.helpers import randomize

TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, projection_dim=32, eos_token_id=2)
VAE = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
UNETS = {
    "sd1": dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, attention_head_dim=4,
                cross_attention_dim=32, norm_num_groups=8, sample_size=8),
    "sd2": dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=2, attention_head_dim=[2, 4],
                cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True, sample_size=8),
    "sdxl": dict(block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, attention_head_dim=[2, 4],
                 transformer_layers_per_block=[1, 2], cross_attention_dim=64, norm_num_groups=8,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=8),
}
# The SD 1.5/2 inpainting UNet: latents + mask + masked-image latents in; the SDXL refiner: only encoder 2's
# 32-wide states, and 5 time ids (sizes, crop corner, aesthetic score).
UNETS["sd1_inpaint"] = dict(UNETS["sd1"], in_channels=9)
UNETS["sdxl_refiner"] = dict(UNETS["sdxl"], cross_attention_dim=32, projection_class_embeddings_input_dim=32 + 5 * 8)
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                 clip_sample=False, set_alpha_to_one=False)


@functools.lru_cache()
def tokenizer_folder(pad_token: str | None) -> str:
    folder = tempfile.mkdtemp(prefix="sd_core_tokenizer_")
    CLIPTokenizer(pad_token=pad_token).save(folder)
    return folder


def text_encoder(projected: bool, act: str, seed: int):
    config = transformers.CLIPTextConfig(**TEXT, hidden_act=act)
    model_class = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
    return randomize(model_class(config), seed)


def stable_diffusion(family: str, seed: int = 0):
    """A diffusers StableDiffusion(XL)Pipeline with tiny seeded components (eval mode); "sd1_inpaint" gives a
    StableDiffusionInpaintPipeline, "sdxl_refiner" a StableDiffusionXLImg2ImgPipeline as the refiner's folder
    names it (text_encoder_2 only, aesthetic-score time ids)."""
    vae = randomize(diffusers.AutoencoderKL(**VAE), seed)
    unet = randomize(diffusers.UNet2DConditionModel(**UNETS[family]), seed + 1)
    scheduler = diffusers.DDIMScheduler(**SCHEDULER, prediction_type="v_prediction" if family == "sd2" else "epsilon")
    if family == "sdxl_refiner":
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, tokenizer=None,
            text_encoder_2=text_encoder(True, "gelu", seed + 3),
            tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tokenizer_folder("!")),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    if family == "sd1_inpaint":
        return diffusers.StableDiffusionInpaintPipeline(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder(False, "quick_gelu", seed + 2),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_folder(None)),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=text_encoder(False, "quick_gelu", seed + 2),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_folder(None)),
            text_encoder_2=text_encoder(True, "gelu", seed + 3),
            tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tokenizer_folder("!")))
    pad = "!" if family == "sd2" else None
    return diffusers.StableDiffusionPipeline(
        vae=vae, unet=unet, scheduler=scheduler,
        text_encoder=text_encoder(False, "gelu" if family == "sd2" else "quick_gelu", seed + 2),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_folder(pad)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def dit(seed: int = 0, num_classes: int = 10):
    """A diffusers DiTPipeline whose blocks share one timestep/label embedder, as every real DiT does."""
    transformer = randomize(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8, patch_size=2, in_channels=4,
        out_channels=8, num_embeds_ada_norm=num_classes), seed)
    shared = transformer.transformer_blocks[0].norm1.emb.state_dict()
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    vae = randomize(diffusers.AutoencoderKL(**VAE), seed + 1)
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
    labels = {i: f"class {i}" for i in range(num_classes)}
    return diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=labels)


def save_pretrained(pipe, folder):
    """diffusers' save_pretrained; for DiT also id2label in model_index.json, which diffusers does not write
    back but the hub's DiT folders carry."""
    pipe.save_pretrained(folder)
    if isinstance(pipe, diffusers.DiTPipeline):
        index = json.loads((folder / "model_index.json").read_text())
        index["id2label"] = {str(i): f"class {i}" for i in range(pipe.transformer.config.num_embeds_ada_norm)}
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def reference_state_dicts(pipe) -> dict:
    names = ("unet", "vae", "text_encoder", "text_encoder_2", "transformer")
    return {name: getattr(pipe, name).state_dict() for name in names if getattr(pipe, name, None) is not None}
