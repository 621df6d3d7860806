"""The embedded ControlNet: a drawn outline -> the shapes model draws its shape there (python -m sd_core.training ...).

    python -m sd_core.training controlnet          --model sd_core/weights/shapes-sd --out runs/controlnet
    python -m sd_core.training evaluate-controlnet --model sd_core/weights/shapes-sd --controlnet runs/controlnet/model

Training follows the paper: the ControlNet starts as a copy of the shapes model's UNet encoder with every zero
convolution zero (ControlNetModel.from_unet); the UNet, VAE and text encoder stay frozen. Each example is one
shape at a random position and size (shapes_dataset.random_placement), its control image the shape's outline,
a 1 or 2 px white line on black in [0, 1] RGB (what diffusers' pipelines pass a ControlNet), and a caption that
names the colour and shape and only sometimes the size, position or background: the outline, not the caption,
must say where. A share of captions is empty so the ControlNet also steers the guidance's unconditional half.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sd_core.checkpoints.catalog import EMBEDDED_GUIDANCE, EMBEDDED_STEPS
from sd_core.checkpoints.controlnet import load_controlnet, save_controlnet
from sd_core.checkpoints.loading import load_pipeline
from sd_core.models.controlnet import ControlNetModel
from sd_core.pipelines.generate import text_to_image
from sd_core.schedulers import make_scheduler
from sd_core.training import shapes_dataset as shapes
from sd_core.training.loop import Run, train
from sd_core.training.recipes import denoising_loss, ema_model, encode_latents, posterior_noise, to_tensor

# The hint encoder's widths: three, so its two stride-2 convs take the 64 px outline to the 16x16 latent.
HINT_WIDTHS = (16, 32, 64)
# A short run: an EMA over ~200 steps follows a ControlNet that learns its task suddenly (the paper's
# "sudden convergence"); the loop's default 0.999 would still average in the untrained start at step 2000.
EMA_DECAY = 0.995
CAPTION_DROPOUT = 0.3
EVALUATION_SEED = 10 ** 9  # evaluation case i draws from EVALUATION_SEED + i; training seeds are far below it
IOU_TARGET = 0.8


@dataclasses.dataclass(frozen=True)
class OutlineExample:
    """One training or evaluation case: the scene, its outline (the control image) and its caption."""
    placement: shapes.Placement
    image: np.ndarray  # (64, 64, 3) uint8, the scene
    outline: np.ndarray  # (64, 64, 3) uint8, white line on black
    caption: str


def outline_example(rng: np.random.Generator) -> OutlineExample:
    """A random placement, its outline of random width (1 or 2 px) and a caption naming colour and shape, with
    each of size, position and background mentioned or not at random. The scene paints the shape out to the
    outline's outer edge (the outline filled), which is what the evaluation scores: a 2 px line lies half outside
    the shape, and a scene painted from the shape's own mask would teach an image that scores under 0.8 IoU on
    such outlines of small shapes (13 of the 100 held-out cases) even when drawn perfectly."""
    placement = shapes.random_placement(rng)
    width = int(rng.integers(1, 3))
    size, position, background = (bool(flag) for flag in rng.random(3) < (0.5, 0.25, 0.5))
    outline = shapes.outline(placement.mask, width)
    return OutlineExample(placement, shapes.paint(shapes.filled(outline), placement.colour, placement.background),
                          outline, placement.caption(size, position, background))


def outline_examples(seed: int, count: int) -> list[OutlineExample]:
    rng = np.random.default_rng(seed)
    return [outline_example(rng) for _ in range(count)]


def hint_tensor(outlines: list[np.ndarray]) -> torch.Tensor:
    """(N, 3, 64, 64) in [0, 1]: control images as diffusers' pipelines hand them to a ControlNet."""
    return torch.from_numpy(np.stack(outlines)).permute(0, 3, 1, 2).float() / 255.0


def early_leaning_timesteps(scheduler, count: int) -> torch.Tensor:
    """Timesteps drawn as T (1 - u^3), u uniform: four in five fall above T/2 (T2I-Adapter's "cubic" sampling).
    Where the shape goes is settled in the first, noisiest steps of sampling, so those are what a control of
    the layout must learn; the late steps only sharpen edges."""
    steps = scheduler.config.num_train_timesteps
    return ((1 - torch.rand(count) ** 3) * steps).long().clamp(max=steps - 1)


def train_controlnet(run: Run, model_folder: Path, caption_dropout: float = CAPTION_DROPOUT):
    """Train a ControlNet for the text-to-image model in `model_folder` (frozen) on outlines; writes --out/model."""
    pipe = load_pipeline(model_folder)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for frozen in (unet, vae, text_encoder):
        frozen.requires_grad_(False).eval()
    torch.manual_seed(run.seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_WIDTHS)
    scheduler = make_scheduler("ddpm", pipe.scheduler_config)

    def draw(step):
        examples = outline_examples(run.seed * 1_000_003 + step, run.batch)
        images = to_tensor([example.image for example in examples])
        latent_noise = posterior_noise(vae, images)
        captions = ["" if torch.rand(()) < caption_dropout else example.caption for example in examples]
        return {"images": images, "latent_noise": latent_noise, "ids": tokenizer(captions),
                "hint": hint_tensor([example.outline for example in examples]),
                "noise": torch.randn_like(latent_noise), "t": early_leaning_timesteps(scheduler, len(examples))}

    def controlled_unet(noisy, t, context, hint):
        down, mid = controlnet(noisy, t, context, hint)
        return unet(noisy, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def loss_fn(part):
        latents = encode_latents(vae, part["images"], part["latent_noise"])
        with torch.no_grad():
            context = text_encoder(part["ids"]).last_hidden_state
        return denoising_loss(scheduler, controlled_unet, latents, part["noise"], part["t"], context, part["hint"])

    controlnet.train()
    ema = train(dataclasses.replace(run, ema_decay=EMA_DECAY), {"controlnet": controlnet}, draw, loss_fn,
                "controlnet", helpers=(unet, vae, text_encoder))
    if ema is not None:
        save_controlnet(ema_model(controlnet, ema["controlnet"]), run.out / "model", overwrite=True)
        print(f"wrote {run.out / 'model'}")


# ------------------------------------------------------------------------------------------- evaluate


def evaluation_case(index: int) -> OutlineExample:
    """Held-out case `index`: drawn from a seed training never uses, prompted "a <colour> <shape> on a <background>
    background" (a user's words: no size, no position)."""
    example = outline_example(np.random.default_rng(EVALUATION_SEED + index))
    return dataclasses.replace(example, caption=example.placement.caption(size=False, position=False, background=True))


def generated_shape(image: np.ndarray) -> np.ndarray:
    """(64, 64) bool: the pixels far from the background colour (the border's median), as shapes_dataset.analyse
    finds a shape."""
    image = np.asarray(image, dtype=float)
    border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                             image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    return np.sqrt(((image - np.median(border, axis=0)) ** 2).sum(-1)) > 60


def evaluate_controlnet(model: Path, controlnet_source, cases: int = 100, start: int = 0) -> dict:
    """Generate each held-out case with the app's defaults through sd_core's ControlNet pipeline and score the IoU
    of the drawn shape with the filled outline; returns the share at IoU >= 0.8 and every case's figures."""
    from PIL import Image

    pipe, controlnet = load_pipeline(model), load_controlnet(controlnet_source)
    results = []
    for index in tqdm(range(start, start + cases), desc="controlnet evaluation"):
        case = evaluation_case(index)
        image = controlled_image(pipe, controlnet, case.caption, Image.fromarray(case.outline), seed=index)
        overlap = shapes.iou(generated_shape(image), shapes.filled(case.outline))
        colour = shapes.analyse(image).get("colour")
        results.append({"index": index, "caption": case.caption, "iou": overlap, "colour": colour,
                        "colour_correct": colour == case.placement.colour, "image": image, "outline": case.outline})
    ious = np.array([r["iou"] for r in results])
    return {"cases": cases, "share_iou_at_least_0.8": float(np.mean(ious >= IOU_TARGET)),
            "median_iou": float(np.median(ious)), "colour_correct": float(np.mean([r["colour_correct"] for r in results])),
            "results": results}


def controlled_image(pipe, controlnet, prompt: str, outline, seed: int) -> np.ndarray:
    """One image at the app's defaults (steps, guidance, the model's size) with the outline as control."""
    result = text_to_image(pipe, prompt, steps=EMBEDDED_STEPS, guidance_scale=EMBEDDED_GUIDANCE, seed=seed,
                           controlnets=[("shapes-controlnet", "none", 1.0, 0.0, 1.0)], control=[(controlnet, outline)])
    return np.asarray(result.images[0])


def outline_picture(results: list, path: Path, columns: int = 4):
    """A picture of outline -> image pairs, `columns` pairs a row."""
    from PIL import Image
    pairs = [np.concatenate([r["outline"], r["image"]], axis=1) for r in results]
    pairs += [np.zeros_like(pairs[0])] * (-len(pairs) % columns)
    rows = [np.concatenate(pairs[i:i + columns], axis=1) for i in range(0, len(pairs), columns)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((columns * 256, len(rows) * 128), Image.NEAREST).save(path)


def add_evaluate_command(commands):
    e = commands.add_parser("evaluate-controlnet", help="score a ControlNet on held-out outlines (IoU)")
    e.add_argument("--model", type=Path, required=True, help="the text-to-image model folder")
    e.add_argument("--controlnet", type=Path, required=True, help="the ControlNet folder")
    e.add_argument("--cases", type=int, default=100)
    e.add_argument("--picture", type=Path, help="write the first 8 cases as outline -> image pairs here")
    e.add_argument("--json", type=Path, help="write the figures (without the images) here")


def run_evaluate_command(args):
    report = evaluate_controlnet(args.model, args.controlnet, args.cases)
    print(f"{report['cases']} held-out outlines: IoU >= {IOU_TARGET} in {100 * report['share_iou_at_least_0.8']:.1f}%, "
          f"median IoU {report['median_iou']:.3f}, colour correct {100 * report['colour_correct']:.1f}%")
    if args.picture:
        outline_picture(report["results"][:8], args.picture)
    if args.json:
        figures = {k: v for k, v in report.items() if k != "results"}
        figures["cases_iou"] = [round(r["iou"], 4) for r in report["results"]]
        args.json.write_text(json.dumps(figures, indent=2))
