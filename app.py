"""sd_core's Gradio app: text to image, VAE round-trip, DiT sampling, and sd_core vs diffusers side by side.

    python app.py                                  # the embedded models, offline, on this machine
    python app.py --models-dir ~/models --share    # also offer the checkpoints found under ~/models

Visitors pick models from a list: the embedded ones, folders and .safetensors files under the
configured model roots (--models-dir / SD_CORE_MODELS_DIR), and hub ids when --allow-hub is given.
A path typed into the API is accepted only if it resolves inside a model root.
"""
import argparse
import gc
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from compare.parity import run_parity
from sd_core.convert import CheckpointError
from sd_core.catalog import (EMBEDDED_DIT, EMBEDDED_DIT_GUIDANCE, EMBEDDED_GUIDANCE, EMBEDDED_STEPS,
                             EMBEDDED_TEXT_TO_IMAGE)
from sd_core.components import DiTPipeline, StableDiffusionPipeline
from sd_core.loading import HUB_ID, load_pipeline
from sd_core.pipelines import MAX_SEED, dit_sample, preview, resolve_seed, text_to_image, vae_roundtrip
from sd_core.schedulers import SCHEDULER_NAMES

EMBEDDED = {"embedded: shapes (text to image)": EMBEDDED_TEXT_TO_IMAGE, "embedded: shapes (DiT)": EMBEDDED_DIT}
PHOTOS = Path(__file__).resolve().parent / "sd_core" / "data" / "photos"
EXAMPLE_SCENE = Path(__file__).resolve().parent / "sd_core" / "data" / "example-scene.png"
MAX_SIZE, MAX_STEPS, MAX_BATCH = 1024, 100, 8


class Settings:
    """What the server operator chose (command line / environment), not what a visitor sends."""
    model_roots: list[Path] = [Path(p).resolve() for p in os.environ.get("SD_CORE_MODELS_DIR", "").split(os.pathsep) if p]
    allow_hub: bool = os.environ.get("SD_CORE_ALLOW_HUB") == "1"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: torch.dtype = torch.float16 if torch.cuda.is_available() else torch.float32


def model_choices(kind: str) -> list[str]:
    """Names a visitor may pick: embedded models, then what lies under the model roots."""
    names = [name for name, folder in EMBEDDED.items() if folder.is_dir() and (kind == "dit") == ("DiT" in name)]
    for root in Settings.model_roots:
        if root.is_dir():
            found = sorted([p.parent for p in root.glob("*/model_index.json")] + list(root.glob("*.safetensors")))
            names += [f"models: {p.relative_to(root)}" for p in found]
    return names


def resolve_source(choice: str) -> str | Path:
    """A visitor's model choice -> something load_pipeline reads. Never a path outside the model roots."""
    choice = (choice or "").strip()
    if choice in EMBEDDED:
        return EMBEDDED[choice]
    relative = choice.removeprefix("models: ")
    for root in Settings.model_roots:
        candidate = (root / relative).resolve()
        if candidate.is_relative_to(root) and candidate.exists() and choice.startswith("models: "):
            return candidate
    if Settings.allow_hub and HUB_ID.match(choice):
        return choice
    raise gr.Error(f"{choice!r} is not one of the offered models. Pick one from the list"
                   + (" or give a hub id like owner/model." if Settings.allow_hub else "."))


class ModelCache:
    """The last few loaded pipelines; older ones are dropped (and their memory freed) when others load."""

    def __init__(self, size: int = 2):
        self.size, self.models, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, choice: str):
        source = resolve_source(choice)
        with self.lock:
            if source in self.models:
                self.models.move_to_end(source)
                return self.models[source]
            try:
                pipe = load_pipeline(source, dtype=Settings.dtype, device=Settings.device)
            except (CheckpointError, FileNotFoundError, ValueError) as error:
                raise gr.Error(str(error)) from None
            self.models[source] = pipe
            while len(self.models) > self.size:
                self.models.popitem(last=False)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            return pipe


MODELS = ModelCache()


def user_errors(fn):
    """Turn bad input (ValueError/TypeError from sd_core) into a gr.Error the visitor reads; the app keeps serving."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, TypeError, FileNotFoundError, CheckpointError) as error:
            raise gr.Error(str(error)) from None
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def as_int(value, name: str, low: int, high: int) -> int:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or float(value) != int(value):
        raise gr.Error(f"{name} must be a whole number; got {value!r}.")
    number = int(value)
    if not low <= number <= high:
        raise gr.Error(f"{name} must be between {low} and {high}; got {number}.")
    return number


def seed_of(seed) -> int:
    """A visitor's seed: -1 (or empty) draws a random one, anything else must be a valid seed."""
    return resolve_seed(None if seed is None or seed < 0 else as_int(seed, "seed", 0, MAX_SEED))


def progress_callback(progress, total: int, pipe=None, trajectory: list | None = None):
    def callback(step, timestep, latents, x0):
        progress((step + 1, total), desc="denoising")
        if trajectory is not None:
            trajectory.append((preview(pipe, x0), f"step {step + 1}"))
    return callback


@user_errors
def generate_images(model, prompt, negative_prompt, steps, guidance_scale, scheduler, width, height, seed, batch,
                    show_trajectory=False, progress=gr.Progress()):
    """Text to image. Returns (images, used seed, trajectory of x0 previews, parameters as JSON)."""
    pipe = MODELS.get(model)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise gr.Error(f"{model} is a DiT model: use the DiT tab.")
    steps = as_int(steps, "steps", 1, MAX_STEPS)
    width, height = as_int(width, "width", 8, MAX_SIZE), as_int(height, "height", 8, MAX_SIZE)
    batch = as_int(batch, "batch", 1, MAX_BATCH)
    seed = seed_of(seed)
    trajectory = [] if show_trajectory else None
    result = text_to_image(pipe, prompt or "", negative_prompt or None, steps=steps, guidance_scale=float(guidance_scale),
                           scheduler=scheduler, width=width, height=height, seed=seed, images_per_prompt=batch,
                           callback=progress_callback(progress, steps, pipe, trajectory))
    return result.images, seed, trajectory or [], json.dumps(result.parameters, indent=2)


@user_errors
def roundtrip(model, image, sample_posterior=False, seed=0):
    """VAE round trip. Returns (reconstruction, difference x4, PSNR dB, latent channels)."""
    if image is None:
        raise gr.Error("Upload an image (or pick an example) first.")
    pipe = MODELS.get(model)
    result = vae_roundtrip(pipe.vae, image, sample=bool(sample_posterior), seed=int(seed or 0))
    channels = [(channel.resize((channel.width * 4, channel.height * 4), Image.NEAREST), f"channel {i}")
                for i, channel in enumerate(result.latent_channels)]
    return result.reconstruction, result.difference, round(result.psnr, 2), channels


@user_errors
def sample_dit(model, class_label, guidance_scale, steps, scheduler, seed, batch, guided_channels="all",
               progress=gr.Progress()):
    """DiT class-conditional sampling. Returns (images, used seed)."""
    pipe = MODELS.get(model)
    if not isinstance(pipe, DiTPipeline):
        raise gr.Error(f"{model} is not a DiT model.")
    steps = as_int(steps, "steps", 1, MAX_STEPS)
    batch = as_int(batch, "batch", 1, MAX_BATCH)
    seed = seed_of(seed)
    result = dit_sample(pipe, [str(class_label)] * batch, guidance_scale=float(guidance_scale), steps=steps,
                        scheduler=scheduler, seed=seed, guided_channels=guided_channels,
                        callback=progress_callback(progress, steps))
    return result.images, seed


@user_errors
def compare_models(model, prompt, negative_prompt, seed, steps, scheduler, guidance_scale, progress=gr.Progress()):
    """sd_core beside diffusers on the same weights and noise. Returns (sd_core image, diffusers image,
    difference map, per-stage table, verdict and first divergent module)."""
    pipe = MODELS.get(model)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise gr.Error("Compare runs text-to-image models; pick a Stable Diffusion model.")
    progress(0, desc="running sd_core and diffusers")
    report = run_parity(pipe, prompt or "", negative_prompt or None, seed=as_int(seed, "seed", 0, MAX_SEED),
                        steps=as_int(steps, "steps", 1, 50), scheduler=scheduler, guidance_scale=float(guidance_scale))
    rows = [[s.name, f"{s.max_abs:.3g}", f"{s.relative:.3g}", f"{s.cosine:.8f}", "pass" if s.passed else "FAIL"]
            for s in report.stages]
    first = report.divergence["first_divergent"]
    verdict = (f"**{'PASS' if report.passed else 'FAIL'}**: {len(report.stages)} stages compared. "
               f"Difference map: |sd_core - diffusers| x {report.images['difference_scale']:g}. "
               f"Per-layer check of the UNet ({report.divergence['modules_compared']} modules): "
               + (f"first divergent module `{first['name']}` (relative error {first['relative']:.3g})."
                  if first else "no module differs beyond 1e-4."))
    return report.images["sd_core"], report.images["diffusers"], report.images["difference"], rows, verdict


def random_seed() -> int:
    return int(np.random.randint(0, MAX_SEED))


def example_images() -> list[str]:
    return [str(EXAMPLE_SCENE)] + sorted(str(p) for p in PHOTOS.glob("*.png"))


def model_dropdown(choices: list[str], label: str = "Model") -> gr.Dropdown:
    return gr.Dropdown(choices, value=choices[0] if choices else None, label=label,
                       allow_custom_value=Settings.allow_hub)


def prompt_inputs(models: list[str], prompt: str):
    return model_dropdown(models), gr.Textbox(prompt, label="Prompt"), gr.Textbox("", label="Negative prompt")


def build() -> gr.Blocks:
    t2i_models, dit_models = model_choices("sd"), model_choices("dit")
    with gr.Blocks(title="sd_core") as demo:
        gr.Markdown("# sd_core\nStable Diffusion and DiT written from scratch in PyTorch, checked number by number "
                    "against diffusers. The embedded models are small, trained here on simple shapes.")
        with gr.Tab("Text to image"):
            with gr.Row():
                with gr.Column():
                    model, prompt, negative = prompt_inputs(t2i_models, "a big red circle on the left on a gray background")
                    run = gr.Button("Generate", variant="primary")
                    with gr.Row():
                        steps = gr.Slider(1, MAX_STEPS, EMBEDDED_STEPS, step=1, label="Steps")
                        guidance = gr.Slider(0, 20, EMBEDDED_GUIDANCE, step=0.5, label="Guidance scale")
                        scheduler = gr.Dropdown(SCHEDULER_NAMES, value="dpmpp_2m", label="Scheduler")
                    with gr.Row():
                        width = gr.Slider(64, MAX_SIZE, 64, step=8, label="Width")
                        height = gr.Slider(64, MAX_SIZE, 64, step=8, label="Height")
                        batch = gr.Slider(1, MAX_BATCH, 4, step=1, label="Images")
                    with gr.Row():
                        seed = gr.Number(-1, label="Seed (-1: random)", precision=0)
                        dice = gr.Button("Random seed", size="sm")
                        trajectory_on = gr.Checkbox(False, label="Show the denoising trajectory (x0 per step)")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png")
                    used_seed = gr.Number(label="Seed used (type it above to reproduce)", precision=0)
                    trajectory = gr.Gallery(label="Trajectory", columns=6, height="auto", format="png")
                    parameters = gr.Code(label="Parameters", language="json")
            dice.click(random_seed, None, seed, api_name=False)
            t2i_inputs = [model, prompt, negative, steps, guidance, scheduler, width, height, seed, batch, trajectory_on]
            run.click(generate_images, t2i_inputs, [gallery, used_seed, trajectory, parameters], api_name="text_to_image")
            if t2i_models:
                defaults = [EMBEDDED_STEPS, EMBEDDED_GUIDANCE]
                gr.Examples([[t2i_models[0], "a small blue square in the center on a white background", "", *defaults,
                              "dpmpp_2m", 64, 64, 1, 4, False],
                             [t2i_models[0], "a big yellow triangle on the right on a black background", "", *defaults,
                              "euler", 64, 64, 7, 4, True]],
                            t2i_inputs, [gallery, used_seed, trajectory, parameters], generate_images,
                            cache_examples=False)
        with gr.Tab("VAE round-trip"):
            with gr.Row():
                with gr.Column():
                    vae_model = model_dropdown(t2i_models + dit_models, "Model (its VAE)")
                    image = gr.Image(type="pil", label="Image")
                    sample_posterior = gr.Checkbox(False, label="Sample the posterior (else its mean)")
                    vae_seed = gr.Number(0, label="Seed for the sample", precision=0)
                    vae_run = gr.Button("Round-trip", variant="primary")
                with gr.Column():
                    reconstruction = gr.Image(label="Reconstruction", format="png")
                    difference = gr.Image(label="|difference| x 4", format="png")
                    psnr = gr.Number(label="PSNR (dB)")
                    channels = gr.Gallery(label="Latent channels", columns=4, height="auto", format="png")
            vae_inputs = [vae_model, image, sample_posterior, vae_seed]
            vae_run.click(roundtrip, vae_inputs, [reconstruction, difference, psnr, channels], api_name="vae_roundtrip")
            examples = example_images()
            if examples and t2i_models:
                gr.Examples([[t2i_models[0], path, False, 0] for path in examples], vae_inputs,
                            [reconstruction, difference, psnr, channels], roundtrip, cache_examples=False)
        with gr.Tab("DiT"):
            with gr.Row():
                with gr.Column():
                    dit_model = model_dropdown(dit_models)
                    labels = dit_labels(dit_models[0]) if dit_models else []
                    class_label = gr.Dropdown(labels, value=labels[0] if labels else None, allow_custom_value=True,
                                              label="Class (name or id)")
                    with gr.Row():
                        dit_guidance = gr.Slider(0, 10, EMBEDDED_DIT_GUIDANCE, step=0.5, label="Guidance scale")
                        dit_steps = gr.Slider(1, MAX_STEPS, EMBEDDED_STEPS, step=1, label="Steps")
                    dit_scheduler = gr.Dropdown(SCHEDULER_NAMES, value="dpmpp_2m", label="Scheduler")
                    with gr.Row():
                        dit_seed = gr.Number(-1, label="Seed (-1: random)", precision=0)
                        dit_batch = gr.Slider(1, MAX_BATCH, 4, step=1, label="Images")
                    guided_channels = gr.Radio(["all", "first3"], value="all",
                                               label="Guided channels (all: diffusers; first3: original DiT code)")
                    dit_run = gr.Button("Sample", variant="primary")
                with gr.Column():
                    dit_gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png")
                    dit_used_seed = gr.Number(label="Seed used", precision=0)
            dit_model.change(lambda m: gr.Dropdown(choices=dit_labels(m)), dit_model, class_label, api_name=False)
            dit_inputs = [dit_model, class_label, dit_guidance, dit_steps, dit_scheduler, dit_seed, dit_batch,
                          guided_channels]
            dit_run.click(sample_dit, dit_inputs, [dit_gallery, dit_used_seed], api_name="dit_sample")
            if dit_models:
                gr.Examples([[dit_models[0], "red circle", EMBEDDED_DIT_GUIDANCE, EMBEDDED_STEPS, "dpmpp_2m", 0, 4, "all"],
                             [dit_models[0], "blue triangle", EMBEDDED_DIT_GUIDANCE, EMBEDDED_STEPS, "ddim", 1, 4, "first3"]],
                            dit_inputs, [dit_gallery, dit_used_seed], sample_dit, cache_examples=False)
        with gr.Tab("Compare"):
            gr.Markdown("The same weights, prompt, seed and scheduler through sd_core and through diffusers' own "
                        "pipeline: both images, their difference, and every stage's error.")
            with gr.Row():
                with gr.Column():
                    cmp_model, cmp_prompt, cmp_negative = prompt_inputs(
                        t2i_models, "a small green triangle on the left on a white background")
                    with gr.Row():
                        cmp_seed = gr.Number(0, label="Seed", precision=0)
                        cmp_steps = gr.Slider(1, 50, 10, step=1, label="Steps")
                    cmp_scheduler = gr.Dropdown(SCHEDULER_NAMES, value="ddim", label="Scheduler")
                    cmp_guidance = gr.Slider(0, 20, 5.0, step=0.5, label="Guidance scale")
                    cmp_run = gr.Button("Compare", variant="primary")
                with gr.Column():
                    with gr.Row():
                        ours_image = gr.Image(label="sd_core", format="png")
                        their_image = gr.Image(label="diffusers", format="png")
                        diff_image = gr.Image(label="difference (amplified)", format="png")
                    verdict = gr.Markdown()
                    stages = gr.Dataframe(headers=["stage", "max |diff|", "relative", "cosine", "verdict"],
                                          label="Per-stage error")
            cmp_run.click(compare_models, [cmp_model, cmp_prompt, cmp_negative, cmp_seed, cmp_steps, cmp_scheduler,
                                           cmp_guidance], [ours_image, their_image, diff_image, stages, verdict],
                          api_name="compare")
    return demo


def dit_labels(choice: str) -> list[str]:
    try:
        pipe = MODELS.get(choice)
    except gr.Error:
        return []
    return [pipe.id2label[i] for i in sorted(pipe.id2label)] if isinstance(pipe, DiTPipeline) else []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", action="append", default=[], help="a folder of models visitors may pick from")
    parser.add_argument("--allow-hub", action="store_true", help="let visitors give Hugging Face hub ids")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--concurrency", type=int, default=2, help="requests computed at once")
    parser.add_argument("--max-queue", type=int, default=32, help="waiting requests before 'queue is full'")
    args = parser.parse_args(argv)
    Settings.model_roots += [Path(p).resolve() for p in args.models_dir]
    Settings.allow_hub = Settings.allow_hub or args.allow_hub
    demo = build().queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
