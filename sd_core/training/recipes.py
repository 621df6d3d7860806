"""Train sd_core's own small models on the procedural shapes dataset (python -m sd_core.training ...).

    python -m sd_core.training vae           --out runs/vae --steps 2500
    python -m sd_core.training vae-decoder   --vae runs/vae/model --out runs/vae-decoder --steps 2500
    python -m sd_core.training text-to-image --vae runs/vae-decoder/model --out runs/sd --steps 9000
    python -m sd_core.training dit           --vae runs/vae-decoder/model --out runs/dit --steps 3500
    (the shipped DiT: the same dit command again with --steps 6000, 13000, 21000 and then 24000)
    python -m sd_core.training evaluate      --model sd_core/weights/shapes-sd --dit sd_core/weights/shapes-dit
    python -m sd_core.training controlnet    --model sd_core/weights/shapes-sd --out runs/controlnet (see .controlnet)

Each run is seeded and resumable (checkpoint.pt in --out, written atomically every --save-every steps;
a rerun continues from it), keeps an EMA of the weights, logs the loss, and writes a diffusers-format
folder (--out/model) that sd_core and diffusers both load. Batches are a pure function of (seed, step),
so a resumed run sees exactly the data an uninterrupted one would.

The same commands run on several processes (DDP) under accelerate, e.g. on a machine without a GPU:
    accelerate launch --multi_gpu --num_processes 2 -m sd_core.training text-to-image --vae ... --out runs/sd
--batch is the global batch of one step whatever the number of processes (it is split between them), and
--gradient-accumulation-steps only cuts each process's share into micro-batches, so neither changes what is
learned (see sd_core.training.loop). --mixed-precision bf16/fp16 runs the forward passes under autocast.
"""
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sd_core.checkpoints.catalog import EMBEDDED_DIT_GUIDANCE, EMBEDDED_GUIDANCE, EMBEDDED_STEPS
from sd_core.checkpoints.loading import load_pipeline, load_vae
from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.checkpoints.saving import atomic_folder, commit_folder, save_model, save_pipeline
from sd_core.models import presets
from sd_core.models.clip import CLIPTextModel
from sd_core.models.dit import DiTTransformer2DModel
from sd_core.models.unet import UNet2DConditionModel
from sd_core.models.vae import AutoencoderKL
from sd_core.schedulers import make_scheduler
from sd_core.tokenizer import CLIPTokenizer
from sd_core.training import shapes_dataset as shapes
from sd_core.training.distributed import cpu_only, finish
from sd_core.training.loop import Run, train

# The embedded models' architectures (64x64 images, 16x16x4 latents).
VAE_CONFIG = dict(block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  sample_size=64, scaling_factor=1.0, force_upcast=False)
TEXT_ENCODER_CONFIG = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=64,
                           eos_token_id=49407)
UNET_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 64],
                   down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[2, 4, 4],
                   cross_attention_dim=64, norm_num_groups=8, use_linear_projection=True)
# Patch 1 (256 tokens): at patch 2 the DiT's x0 estimates stayed blobby even at t=300 (squares lost their
# corners inside 2x2-latent patches), and its class accuracy was 36% after 5000 steps.
DIT_CONFIG = dict(num_attention_heads=4, attention_head_dim=32, num_layers=6, sample_size=16, patch_size=1,
                  in_channels=4, out_channels=4, num_embeds_ada_norm=1000)  # id 1000: the null class DiTPipeline uses
# v-prediction: with eps-prediction, these small models' x0 estimates at high noise were noise-amplified
# textures after 1500 steps (the eps error is multiplied by 1/sqrt(alpha_bar), ~24x at t=900); predicting
# v = sqrt(a) eps - sqrt(1-a) x0 makes the high-noise steps learn the layout directly.
SD_SCHEDULER = {**presets.SCHEDULER_SD, "_class_name": "DPMSolverMultistepScheduler", "timestep_spacing": "linspace",
                "steps_offset": 1, "prediction_type": "v_prediction"}  # the offset only matters for "leading"
DIT_SCHEDULER = {**presets.SCHEDULER_DIT, "_class_name": "DPMSolverMultistepScheduler", "timestep_spacing": "linspace",
                 "prediction_type": "v_prediction"}


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def batch_of_scenes(run: Run, step: int):
    scenes = shapes.sample_scenes(run.seed * 1_000_003 + step, run.batch)
    return [scene for scene, _ in scenes], to_tensor([image for _, image in scenes])


def ema_model(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    model.load_state_dict(state)
    return model.eval()


# Each trainer gives the loop a draw(step) that makes the whole global batch with every random number of the
# step, in the order the single-process loop drew them (so old runs reproduce), and a loss(part) of a slice.


def posterior_noise(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The noise DiagonalGaussian.sample() would draw for these images' latents."""
    size = images.shape[-1] // vae.downscale_factor
    return torch.randn(len(images), vae.config.latent_channels, size, size)


def sample_latents(vae: AutoencoderKL, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    posterior = vae.encode(images)
    return posterior, posterior.mean + posterior.std * noise


# ------------------------------------------------------------------------------------------------ VAE


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(reconstruction, images) + 0.1 * F.l1_loss(reconstruction, images)


def save_vae(vae: AutoencoderKL, folder: Path):
    temporary = atomic_folder(folder, overwrite=True)
    save_model(vae, temporary / "vae", "AutoencoderKL")
    commit_folder(temporary, folder)
    print(f"wrote {folder} (scaling_factor {vae.config.scaling_factor})")


def draw_images(run: Run, vae: AutoencoderKL):
    def draw(step):
        _, images = batch_of_scenes(run, step)
        return {"images": images, "noise": posterior_noise(vae, images)}
    return draw


def train_vae(run: Run, config: dict = VAE_CONFIG, kl_weight: float = 1e-6):
    torch.manual_seed(run.seed)  # the initial weights, too, are a function of the seed
    vae = AutoencoderKL.from_config(config)

    def loss_fn(part):
        posterior, latents = sample_latents(vae, part["images"], part["noise"])
        return reconstruction_loss(vae.decode(latents), part["images"]) + kl_weight * posterior.kl().mean()

    vae.train()
    ema = train(run, {"vae": vae}, draw_images(run, vae), loss_fn, "vae")
    if ema is None:
        return  # not the main process
    vae = ema_model(vae, ema["vae"])
    with torch.no_grad():  # scale the latents to unit variance, as SD's 0.18215 does
        _, images = batch_of_scenes(dataclasses.replace(run, batch=256), 10 ** 7)
        vae.config.scaling_factor = round(1.0 / vae.encode(images.to(next(vae.parameters()).device)).mode().std().item(), 5)
    save_vae(vae, run.out / "model")


def train_vae_decoder(run: Run, vae_folder: Path):
    """Train on only the decoder of a trained VAE, as Stability's sd-vae-ft-mse did: the encoder, and so the
    latent space the diffusion models learned, stays bit for bit, so the new VAE drops into their folders."""
    vae = load_vae(Path(vae_folder) / "vae")
    for name, parameter in vae.named_parameters():
        parameter.requires_grad_(not name.startswith(("encoder.", "quant_conv.")))

    def loss_fn(part):
        with torch.no_grad():
            _, latents = sample_latents(vae, part["images"], part["noise"])
        return reconstruction_loss(vae.decode(latents), part["images"])

    vae.train()
    ema = train(run, {"vae": vae}, draw_images(run, vae), loss_fn, "vae decoder")
    if ema is not None:
        save_vae(ema_model(vae, ema["vae"]), run.out / "model")


def draw_denoising(scheduler, latent_noise: torch.Tensor) -> dict:
    """The diffusion noise and uniform random timesteps for a batch of latents shaped like `latent_noise`.
    (Before accelerate the noise was randn_like(latents), which follows the encoder output's memory layout,
    channels-last on CPU, so the same random numbers landed permuted; now it is always drawn contiguous.)"""
    return {"noise": torch.randn_like(latent_noise),
            "t": torch.randint(0, scheduler.config.num_train_timesteps, (len(latent_noise),))}


def denoising_loss(scheduler, model, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   *conditioning) -> torch.Tensor:
    """Noise the latents at timesteps t; regress the target of the scheduler's prediction type."""
    target = scheduler.velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    return F.mse_loss(model(scheduler.add_noise(latents, noise, t), t, *conditioning), target)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return sample_latents(vae, images, noise)[1] * vae.config.scaling_factor


# -------------------------------------------------------------------------------------- text to image


def train_text_to_image(run: Run, vae_folder: Path, text_encoder_config: dict = TEXT_ENCODER_CONFIG,
                        unet_config: dict = UNET_CONFIG, caption_dropout: float = 0.1):
    vae = load_vae(Path(vae_folder) / "vae")
    torch.manual_seed(run.seed)
    tokenizer = CLIPTokenizer()
    text_encoder = CLIPTextModel.from_config(text_encoder_config)
    unet = UNet2DConditionModel.from_config(unet_config)
    scheduler = make_scheduler("ddpm", SD_SCHEDULER)

    def draw(step):
        scenes, images = batch_of_scenes(run, step)
        latent_noise = posterior_noise(vae, images)
        captions = ["" if torch.rand(()) < caption_dropout else scene.caption for scene in scenes]
        return {"images": images, "latent_noise": latent_noise, "ids": tokenizer(captions),
                **draw_denoising(scheduler, latent_noise)}

    def loss_fn(part):
        latents = encode_latents(vae, part["images"], part["latent_noise"])
        return denoising_loss(scheduler, unet, latents, part["noise"], part["t"],
                              text_encoder(part["ids"]).last_hidden_state)

    text_encoder.train(), unet.train()
    ema = train(run, {"text_encoder": text_encoder, "unet": unet}, draw, loss_fn, "text-to-image", helpers=(vae,))
    if ema is None:
        return
    pipe = StableDiffusionPipeline("sd1", ema_model(unet, ema["unet"]), vae, dict(SD_SCHEDULER),
                                   ema_model(text_encoder, ema["text_encoder"]), tokenizer)
    save_pipeline(pipe, run.out / "model", overwrite=True)
    print(f"wrote {run.out / 'model'}")


# ------------------------------------------------------------------------------------------------ DiT


def train_dit(run: Run, vae_folder: Path, config: dict = DIT_CONFIG, label_dropout: float = 0.1):
    vae = load_vae(Path(vae_folder) / "vae")
    torch.manual_seed(run.seed)
    dit = DiTTransformer2DModel.from_config(config).initialize_weights()
    scheduler = make_scheduler("ddpm", DIT_SCHEDULER)
    null_class = dit.config.null_class

    def draw(step):
        scenes, images = batch_of_scenes(run, step)
        latent_noise = posterior_noise(vae, images)
        labels = torch.tensor([scene.class_id for scene in scenes])
        labels = torch.where(torch.rand(len(labels)) < label_dropout, null_class, labels)  # for guidance
        return {"images": images, "latent_noise": latent_noise, "labels": labels,
                **draw_denoising(scheduler, latent_noise)}

    def loss_fn(part):
        latents = encode_latents(vae, part["images"], part["latent_noise"])
        return denoising_loss(scheduler, dit, latents, part["noise"], part["t"], part["labels"])

    dit.train()
    ema = train(run, {"dit": dit}, draw, loss_fn, "dit", helpers=(vae,))
    if ema is None:
        return
    id2label = dict(enumerate(shapes.CLASS_NAMES))
    save_pipeline(DiTPipeline(ema_model(dit, ema["dit"]), vae, dict(DIT_SCHEDULER), id2label), run.out / "model",
                  overwrite=True)
    print(f"wrote {run.out / 'model'}")


# ------------------------------------------------------------------------------------------- evaluate

PHOTOS = Path(__file__).parents[1] / "data" / "photos"


def share_of_work(items: list) -> tuple:
    """(state, this process's share of [(index, item)]): every item on one process, a contiguous share each
    under accelerate launch / torchrun."""
    from accelerate import PartialState
    state = PartialState(cpu=cpu_only())
    with state.split_between_processes(list(enumerate(items))) as share:
        return state, share


def gather_in_order(state, results: list) -> list:
    """Every process's [(index, ...)] results, on every process, in index order."""
    from accelerate.utils import gather_object
    return sorted(gather_object(results) if state.num_processes > 1 else results, key=lambda r: r[0])


def evaluate(model: Path, dit_model: Path | None, seeds: int = 4, grid: Path | None = None,
             limit: int | None = None) -> dict | None:
    """Generate every held-out prompt x `seeds` and score the images; DiT per class; VAE PSNR. Under
    accelerate launch each process generates a share of the prompts and classes (prompt i always from seed i,
    so the scores do not depend on the process count) and the main process gathers them and returns the
    report; the others return None. `limit` evaluates only the first prompts and classes (a quick check)."""
    from PIL import Image

    from sd_core.pipelines.generate import dit_sample, text_to_image, vae_roundtrip
    pipe = load_pipeline(model)
    held_out = sorted(shapes.HELD_OUT, key=lambda s: s.caption)[:limit]
    state, share = share_of_work(held_out)
    results = []
    for i, scene in tqdm(share, desc="text to image", disable=not state.is_main_process):
        result = text_to_image(pipe, [scene.caption], steps=EMBEDDED_STEPS, guidance_scale=EMBEDDED_GUIDANCE, seed=i,
                               images_per_prompt=seeds)
        results.append((i, [shapes.score(np.asarray(image), scene) for image in result.images],
                        np.concatenate([np.asarray(image) for image in result.images], axis=1)))
    classes = shapes.CLASS_NAMES[:limit] if dit_model is not None else []
    dit = load_pipeline(dit_model) if classes else None
    _, class_share = share_of_work(classes)
    dit_results = []
    for class_id, name in tqdm(class_share, desc="dit", disable=not state.is_main_process):
        result = dit_sample(dit, [class_id] * seeds, guidance_scale=EMBEDDED_DIT_GUIDANCE, steps=EMBEDDED_STEPS,
                            seed=class_id)
        colour, shape = name.split()
        found = [shapes.analyse(np.asarray(image)) for image in result.images]
        dit_results.append((class_id, [f.get("colour") == colour and f.get("shape") == shape for f in found],
                            np.concatenate([np.asarray(image) for image in result.images], axis=1)))
    results, dit_results = gather_in_order(state, results), gather_in_order(state, dit_results)
    if not state.is_main_process:
        finish(state)
        return None
    scores = [score for _, image_scores, _ in results for score in image_scores]
    tiles = [tile for _, _, tile in results]
    report = {"text_to_image": {name: float(np.mean([getattr(s, name) for s in scores]))
                                for name in ("colour", "position", "shape", "size", "clean_background", "all")},
              "prompts": len(held_out), "images": len(scores), "processes": state.num_processes}
    start = time.perf_counter()
    for _ in range(3):
        text_to_image(pipe, held_out[0].caption, steps=EMBEDDED_STEPS, guidance_scale=EMBEDDED_GUIDANCE, seed=0)
    report["seconds_per_image"] = (time.perf_counter() - start) / 3
    rng = np.random.default_rng(99)
    held_out_images = [shapes.render(scene, rng) for scene in held_out]
    report["vae_psnr_held_out_scenes"] = float(np.mean([vae_roundtrip(pipe.vae, Image.fromarray(image)).psnr
                                                        for image in held_out_images]))
    photos = sorted(PHOTOS.glob("*.png"))
    if photos:
        report["vae_psnr_photos"] = {p.stem: round(vae_roundtrip(pipe.vae, p).psnr, 2) for p in photos}
    if dit_results:
        report["dit_class_accuracy"] = float(np.mean([ok for _, correct, _ in dit_results for ok in correct]))
    if grid is not None:
        dit_tiles = [tile for class_id, _, tile in dit_results if class_id % 3 == 0]
        width = max(t.shape[1] for t in tiles + dit_tiles)
        rows = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles[:8] + dit_tiles]
        Image.fromarray(np.concatenate(rows, axis=0)).save(grid)
    finish(state)
    return report


def print_report(report: dict):
    t2i = report["text_to_image"]
    print(f"text to image ({report['prompts']} held-out prompts, {report['images']} images, {EMBEDDED_STEPS} steps, "
          f"guidance {EMBEDDED_GUIDANCE}):")
    print("| colour | position | shape | size | clean background | all of colour+position+shape+background |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("| " + " | ".join(f"{100 * t2i[k]:.1f}%" for k in ("colour", "position", "shape", "size",
                                                              "clean_background", "all")) + " |")
    print(f"seconds per image at the defaults: {report['seconds_per_image']:.2f}")
    if "dit_class_accuracy" in report:
        print(f"DiT requested class: {100 * report['dit_class_accuracy']:.1f}%")
    print(f"VAE PSNR, held-out scenes: {report['vae_psnr_held_out_scenes']:.2f} dB")
    if "vae_psnr_photos" in report:
        print(f"VAE PSNR, photos: {report['vae_psnr_photos']}")
