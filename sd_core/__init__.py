"""sd_core: Stable Diffusion 1.x/2.x/XL and DiT from scratch in PyTorch, number for number with diffusers.

The public surface, so that programs do not depend on where a function lives:

    from sd_core import load_pipeline, text_to_image, save_image
    pipe = load_pipeline("sd_core/weights/shapes-sd")
    result = text_to_image(pipe, "a big red circle on the left on a gray background", steps=20, seed=7)
    save_image(result.images[0], "circle.png")

The package's folders are its layers (each imports only those below it; tests/test_layers.py holds them):
app > fast, training > pipelines > checkpoints > models, schedulers, tokenizer > config, noise, files.
Names are imported on first use, so `import sd_core.models.unet` does not load the pipelines.
"""
import importlib

PUBLIC = {
    "sd_core.checkpoints.loading": ("load_pipeline", "load_vae"),
    "sd_core.checkpoints.saving": ("save_pipeline", "export_single_file"),
    "sd_core.checkpoints.pipeline_classes": ("StableDiffusionPipeline", "DiTPipeline"),
    "sd_core.pipelines.generate": ("generate", "text_to_image", "image_to_image", "inpaint", "refine",
                                   "vae_roundtrip", "dit_sample"),
    "sd_core.pipelines.image_io": ("load_image", "save_image"),
    "sd_core.pipelines.metadata": ("read_png_parameters",),
    "sd_core.pipelines.lora": ("load_lora", "loras_applied"),
    "sd_core.pipelines.textual_inversion": ("load_embedding", "add_embedding"),
    "sd_core.pipelines.offload": ("enable_model_cpu_offload",),
    "sd_core.pipelines.previews": ("latent_preview", "fast_preview"),
    "sd_core.schedulers": ("make_scheduler", "SCHEDULER_NAMES"),
    "sd_core.fast.pipeline": ("make_fast", "FastOptions"),
}
MODULE_OF = {name: module for module, names in PUBLIC.items() for name in names}
__all__ = sorted(MODULE_OF)


def __getattr__(name: str):
    if name not in MODULE_OF:
        raise AttributeError(f"module 'sd_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
