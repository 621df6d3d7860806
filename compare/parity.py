"""Run sd_core and diffusers side by side on the same weights, noise and scheduler; measure every stage.

    report = run_parity("path/to/model", "a red circle", seed=0, steps=20, scheduler="ddim")
    report.write(Path("parity-report"))      # report.json, report.md, images.png

Stages: token ids (exact), text embeddings (what the UNet receives), the UNet's noise prediction and the
latents after every step, the decoded 8-bit images. `first_divergence` hooks every module of two models
whose names match (sd_core's mirror diffusers') and names the first, in execution order, that differs.
"""
import contextlib
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sd_core.pipelines.conditioning import added_conditioning, pooled_width
from sd_core.pipelines.image_io import crop_to_multiple, load_image
from sd_core.checkpoints.loading import MODEL_CLASSES, SkipRandomInit, load_pipeline
from sd_core.pipelines.generate import encode_text, image_to_image, text_to_image
from sd_core.schedulers import DIFFUSERS_CLASS_NAMES, VARIANTS

TOLERANCE = 1e-4  # component outputs: max |a - b| relative to the reference's scale, as the parity tests use
# sd_core sampler name -> diffusers scheduler class name (the inverse of sd_core's mapping).
REFERENCE_SCHEDULERS = {name: cls for cls, name in DIFFUSERS_CLASS_NAMES.items()}


@dataclasses.dataclass
class Stage:
    name: str
    max_abs: float
    mean_abs: float
    relative: float  # max |a - b| / max |reference|
    cosine: float
    tolerance: float
    passed: bool
    extra: dict = dataclasses.field(default_factory=dict)



def probe_conditioning(pipe, rows: int, height: int, width: int) -> dict | None:
    """SDXL's added conditioning for a probe of `rows` UNet rows: a seeded pooled embedding of the width the UNet
    takes and the model's own time ids (the base's 6, the refiner's 5); None for SD 1.x/2.x."""
    if pipe.unet.config.addition_embed_type != "text_time":
        return None
    pooled = torch.randn(rows, pooled_width(pipe), generator=torch.Generator().manual_seed(1))
    return added_conditioning(pipe, pooled, rows, False, (height, width))

def compare_tensors(name: str, ours: torch.Tensor, reference: torch.Tensor, tolerance: float = TOLERANCE) -> Stage:
    a, b = ours.detach().double().flatten(), reference.detach().double().flatten()
    if a.shape != b.shape:
        return Stage(name, math.inf, math.inf, math.inf, 0.0, tolerance, False,
                     {"shapes": [list(ours.shape), list(reference.shape)]})
    difference = (a - b).abs()
    relative = (difference.max() / b.abs().max().clamp_min(1e-12)).item() if a.numel() else 0.0
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12).item() if a.numel() else 1.0
    return Stage(name, difference.max().item() if a.numel() else 0.0, difference.mean().item() if a.numel() else 0.0,
                 relative, cosine, tolerance, relative <= tolerance)


def compare_images(ours: np.ndarray, reference: np.ndarray) -> Stage:
    """8-bit images: equal, or at most 1 level off in at most 0.1% of values."""
    if ours.shape != reference.shape:
        return Stage("decoded images (8-bit)", math.inf, math.inf, math.inf, 0.0, 1 / 255, False,
                     {"shapes": [list(ours.shape), list(reference.shape)]})
    a, b = ours.astype(np.int32), reference.astype(np.int32)
    difference = np.abs(a - b)
    mse = float(np.mean((a - b) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
    differing = int((difference > 0).sum())
    passed = difference.max() <= 1 and differing <= 0.001 * difference.size
    return Stage("decoded images (8-bit)", float(difference.max()), float(difference.mean()),
                 float(difference.max()) / 255, 1.0, 1 / 255, bool(passed),
                 {"psnr_db": psnr, "differing_values": differing, "values": int(difference.size)})


# ------------------------------------------------------------------------------------------ recording


def first_tensor(output):
    """The main tensor of a module's output: a tensor, `.sample`, `.last_hidden_state`, or a tuple's first."""
    if torch.is_tensor(output):
        return output
    for attribute in ("sample", "last_hidden_state"):
        if torch.is_tensor(getattr(output, attribute, None)):
            return getattr(output, attribute)
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


class UNetRecorder:
    """Forward hook on a UNet: its text input (first call) and its raw output at every call."""

    def __init__(self, unet):
        self.context, self.outputs = None, []
        self.handle = unet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        if self.context is None:
            self.context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None).detach().clone()
        self.outputs.append(first_tensor(output).detach().clone())

    def remove(self):
        self.handle.remove()


def record_modules(model: torch.nn.Module, run) -> list:
    """[(name, occurrence, output)] for every named submodule, in execution order, while `run()` runs."""
    records, counts, handles = [], {}, []

    def hook_for(name):
        def hook(module, args, output):
            tensor = first_tensor(output)
            if tensor is not None and tensor.is_floating_point():
                counts[name] = counts.get(name, 0) + 1
                records.append((name, counts[name] - 1, tensor.detach().clone()))
        return hook
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook_for(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return records


def first_divergence(ours: torch.nn.Module, reference: torch.nn.Module, run_ours, run_reference,
                     tolerance: float = TOLERANCE) -> dict:
    """Hook every module of both models, run each once, and name the first module (in sd_core's execution
    order) whose output differs from the same-named diffusers module beyond `tolerance`."""
    ours_records = record_modules(ours, run_ours)
    reference_records = {(name, i): t for name, i, t in record_modules(reference, run_reference)}
    compared, first = [], None
    for name, i, tensor in ours_records:
        if (name, i) not in reference_records or reference_records[(name, i)].shape != tensor.shape:
            continue
        stage = compare_tensors(name if i == 0 else f"{name} (call {i + 1})", tensor, reference_records[(name, i)],
                                tolerance)
        compared.append(stage)
        if first is None and not stage.passed:
            first = stage
    worst = sorted(compared, key=lambda s: -s.relative)[:5]
    return {"modules_compared": len(compared), "first_divergent": dataclasses.asdict(first) if first else None,
            "worst": [dataclasses.asdict(s) for s in worst], "tolerance": tolerance,
            # every compared module in execution order, for the per-module chart
            "modules": [{"name": s.name, "relative": s.relative, "max_abs": s.max_abs, "cosine": s.cosine,
                         "passed": s.passed} for s in compared]}


# ------------------------------------------------------------------------------------------------ run


@dataclasses.dataclass
class ParityReport:
    settings: dict
    stages: list
    divergence: dict
    images: dict  # "sd_core", "diffusers": PIL images (first of the batch); "difference", with "difference_scale"

    @property
    def passed(self) -> bool:
        return all(stage.passed for stage in self.stages)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "passed": self.passed,
                "stages": [dataclasses.asdict(s) for s in self.stages], "divergence": self.divergence,
                "difference_scale": self.images.get("difference_scale")}

    def markdown(self) -> str:
        lines = [f"# sd_core vs diffusers: {'PASS' if self.passed else 'FAIL'}", "",
                 "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), "",
                 "| stage | max abs | mean abs | relative | cosine | tolerance | verdict |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for s in self.stages:
            lines.append(f"| {s.name} | {s.max_abs:.3g} | {s.mean_abs:.3g} | {s.relative:.3g} | {s.cosine:.8f} | "
                         f"{s.tolerance:.3g} | {'pass' if s.passed else 'FAIL'} |")
        first = self.divergence.get("first_divergent")
        lines += ["", f"Modules compared (UNet, step 1): {self.divergence.get('modules_compared', 0)}; first divergent: "
                  + (f"`{first['name']}` (relative {first['relative']:.3g})" if first else "none")]
        if "difference_scale" in self.images:
            lines.append(f"Difference map: |sd_core - diffusers| x {self.images['difference_scale']:.3g}.")
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=float))
        (folder / "report.md").write_text(self.markdown())
        side_by_side(self.images).save(folder / "images.png")
        return folder


def difference_map(a: Image.Image, b: Image.Image) -> tuple[Image.Image, float]:
    """|a - b| (max over channels) amplified so the largest difference is bright; returns the gain used."""
    difference = np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max(axis=-1)
    gain = 255.0 / difference.max() if difference.max() > 0 else 1.0
    level = np.clip(difference * gain, 0, 255).astype(np.uint8)
    heat = np.stack([level, np.clip(level.astype(int) * 2 - 255, 0, 255).astype(np.uint8), np.zeros_like(level)], -1)
    return Image.fromarray(heat), gain


def difference_caption(gain: float) -> str:
    """The difference map's caption with its gain to three figures (x9.44, x255), as a reader takes it in."""
    return f"|difference| x{gain:.3g}"


def side_by_side(images: dict) -> Image.Image:
    tiles = [("sd_core", images["sd_core"]), ("diffusers", images["diffusers"]),
             (difference_caption(images["difference_scale"]), images["difference"])]
    width, height = images["sd_core"].size
    scale = max(1, 256 // max(width, height))
    canvas = Image.new("RGB", (3 * width * scale, height * scale + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, image) in enumerate(tiles):
        canvas.paste(image.resize((width * scale, height * scale), Image.NEAREST), (i * width * scale, 16))
        draw.text((i * width * scale + 4, 2), title, fill="black")
    return canvas


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' bars and notices (config keys it ignores, the safety checker) are not news in a comparison's log."""
    import diffusers
    diffusers.utils.logging.disable_progress_bar()
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers' (or transformers') own class for an sd_core model, on its very tensors: the names match by design."""
    import accelerate
    import diffusers
    import transformers
    class_name, config = type(model).__name__, model.config.to_dict()
    # parameters as shapes only; buffers the state_dict lacks (CLIP's position ids, DiT's position table) computed
    with quiet_diffusers(), accelerate.init_empty_weights(include_buffers=False), SkipRandomInit():
        if class_name in MODEL_CLASSES and MODEL_CLASSES[class_name][2] == "transformers":
            reference = getattr(transformers, class_name)(transformers.CLIPTextConfig(**config))
        else:
            reference = getattr(diffusers, class_name).from_config(config)
    reference.load_state_dict(model.state_dict(), strict=True, assign=True)  # assign: shared, not copied
    return reference.eval()


def reference_tokenizer(tokenizer):
    """transformers' CLIPTokenizer reading the files sd_core's tokenizer writes (a few MB at most, never weights)."""
    import transformers
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def reference_pipeline(pipe):
    """The pipeline class sd_core's saved folder names, on sd_core's very tensors: no weights written, read or cast."""
    import diffusers
    components = {name: reference_model(model) for name, model in pipe.models.items()}
    scheduler_class = getattr(diffusers, pipe.scheduler_config.get("_class_name", "DDIMScheduler"))
    traits = pipe.traits
    pipeline_class = getattr(diffusers, traits.diffusers_pipeline)
    if traits.denoiser == "transformer":  # class-conditioned: its labels instead of tokenizers
        settings = dict(id2label=pipe.id2label)
    else:
        for name in traits.tokenizer_slots:
            tokenizer = getattr(pipe, name)
            components[name] = reference_tokenizer(tokenizer) if tokenizer is not None else None
            components.setdefault(name.replace("tokenizer", "text_encoder"), None)
        if not traits.xl:
            settings = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:  # the refiner's flag only where set: StableDiffusionXLPipeline takes none
            settings = dict(force_zeros_for_empty_prompt=traits.zeros_for_empty_negative)
            if traits.requires_aesthetics_score:
                settings["requires_aesthetics_score"] = True
    with quiet_diffusers():
        scheduler = scheduler_class.from_config(pipe.scheduler_config)
        reference = pipeline_class(**components, scheduler=scheduler, **settings)
    reference.set_progress_bar_config(disable=True)
    return reference


@torch.no_grad()
def parity_reference(pipe, scheduler: str, image_to_image: bool):
    """diffusers' pipeline on sd_core's tensors (its image-to-image class when asked), with the same sampler."""
    import diffusers
    reference = reference_pipeline(pipe)
    if image_to_image:
        image_class = (diffusers.StableDiffusionXLImg2ImgPipeline if pipe.traits.xl
                       else diffusers.StableDiffusionImg2ImgPipeline)
        with quiet_diffusers():  # from_pipe keeps the text-to-image pipeline's flags (no safety checker asked for)
            reference = image_class.from_pipe(reference)
        reference.set_progress_bar_config(disable=True)
    sampler, overrides, _ = VARIANTS.get(scheduler, (scheduler, {}, None))  # e.g. dpmpp_2m_karras
    reference.scheduler = getattr(diffusers, REFERENCE_SCHEDULERS[sampler]).from_config(pipe.scheduler_config,
                                                                                      **overrides)
    return reference


def token_stages(pipe, reference, texts: list[str]) -> list:
    """Each tokenizer's ids for the prompt and the negative prompt, sd_core's against transformers'."""
    stages = []
    for name in ("tokenizer", "tokenizer_2"):
        ours_tokenizer, their_tokenizer = getattr(pipe, name), getattr(reference, name, None)
        if ours_tokenizer is None or their_tokenizer is None:
            continue
        ours_ids = encode_text(ours_tokenizer, texts, "cpu")
        their_ids = torch.tensor(their_tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids)
        stage = compare_tensors(f"token ids ({name})", ours_ids.float(), their_ids.float(), 0.0)
        stage.extra["equal"] = bool(torch.equal(ours_ids, their_ids))
        stages.append(stage)
    return stages


def unet_divergence(pipe, reference, context: torch.Tensor, height: int, width: int, seed: int) -> dict:
    """The first divergent module at step 1, on the UNet inputs both sides actually used (seeded latents)."""
    sample = torch.randn((context.shape[0], pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
                          width // pipe.vae_scale_factor), generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(500)
    added = probe_conditioning(pipe, sample.shape[0], height, width)
    return first_divergence(pipe.unet, reference.unet, lambda: pipe.unet(sample, t, context, added),
                            lambda: reference.unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added))


def run_parity(model, prompt: str, negative_prompt: str | None = None, seed: int = 0, steps: int = 10,
               scheduler: str = "ddim", guidance_scale: float = 7.5, height: int | None = None,
               width: int | None = None, image=None, strength: float = 0.8) -> ParityReport:
    """Generate with sd_core and with diffusers on the same weights and noise; compare every stage. With `image`,
    image to image (`strength`) against diffusers' StableDiffusion(XL)Img2ImgPipeline."""
    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    if pipe.traits.denoiser == "transformer":
        raise ValueError("The parity run compares text-to-image pipelines; pass a Stable Diffusion model.")
    if image is not None:  # both sides get the very picture sd_core samples from
        image = crop_to_multiple(load_image(image), pipe.vae_scale_factor)
        height, width = image.height, image.width
    height, width = height or pipe.default_size, width or pipe.default_size
    reference = parity_reference(pipe, scheduler, image_to_image=image is not None)
    stages = token_stages(pipe, reference, [prompt, negative_prompt or ""])

    ours_unet, their_unet = UNetRecorder(pipe.unet), UNetRecorder(reference.unet)
    ours_latents, their_latents = [], []
    try:
        def record(i, t, x, x0):
            ours_latents.append(x.clone())
        if image is None:
            result = text_to_image(pipe, prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale,
                                   scheduler=scheduler, seed=seed, height=height, width=width, callback=record)
        else:
            result = image_to_image(pipe, image, prompt, negative_prompt, strength=strength, steps=steps,
                                    guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, callback=record)

        def on_step_end(_, i, t, tensors):
            their_latents.append(tensors["latents"].clone())
            return {}
        size = dict(height=height, width=width) if image is None else dict(image=image, strength=strength)
        theirs = reference(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                           guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                           output_type="np", callback_on_step_end=on_step_end, **size).images
    finally:
        ours_unet.remove(), their_unet.remove()
    stages.append(compare_tensors("text embeddings (UNet input)", ours_unet.context, their_unet.context))
    for i, (a, b) in enumerate(zip(ours_unet.outputs, their_unet.outputs)):
        stages.append(compare_tensors(f"step {i + 1} noise prediction", a, b))
    for i, (a, b) in enumerate(zip(ours_latents, their_latents)):
        stages.append(compare_tensors(f"step {i + 1} latents", a, b))
    ours_image = np.asarray(result.images[0])
    their_image = (theirs[0] * 255).round().astype("uint8")
    stages.append(compare_images(np.stack([np.asarray(im) for im in result.images]),
                                 (theirs * 255).round().astype("uint8")))

    divergence = unet_divergence(pipe, reference, ours_unet.context, height, width, seed)
    difference, gain = difference_map(Image.fromarray(ours_image), Image.fromarray(their_image))
    settings = {"model": pipe.source, "family": pipe.family, "prompt": prompt, "negative_prompt": negative_prompt,
                "seed": seed, "steps": steps, "scheduler": scheduler, "guidance_scale": guidance_scale,
                "height": height, "width": width}
    if image is not None:
        settings["strength"] = strength
    images = {"sd_core": Image.fromarray(ours_image), "diffusers": Image.fromarray(their_image),
              "difference": difference, "difference_scale": gain}
    return ParityReport(settings, stages, divergence, images)
