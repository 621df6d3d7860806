"""What each API parameter means, said once for every endpoint that takes it. `documented(fn)` gives a handler's
docstring an "Args:" section from this glossary: gradio reads it for the API page and serves it as the MCP tools'
parameter descriptions, so an agent knows what to send without reading the page."""
import inspect

from sd_core.pipelines.settings import MAX_SEED
from sd_core.schedulers import SCHEDULER_NAMES

MODEL = ("the model's name as the app lists it, e.g. 'embedded: shapes (text to image)' or 'embedded: shapes "
         "(DiT)'; models under the server's model roots are 'models: NAME'")
SHAPES_PROMPT = "(the embedded model knows captions like 'a big red circle on the left on a gray background')"
IMAGE = "an image file (PNG, JPEG, WebP, BMP, GIF or TIFF)"
PARAMETERS = {
    "model": MODEL,
    "prompt": f"what to draw, in words {SHAPES_PROMPT}",
    "negative_prompt": "what to steer away from; '' for nothing",
    "second_prompt": "the prompt the walk ends on",
    "steps": "denoising steps: more is slower and usually finer",
    "guidance_scale": "classifier-free guidance: how closely the picture follows the prompt or class (1 or less: "
                      "not at all; 5-8 usual; 0 for Turbo models)",
    "scheduler": f"the sampler, one of {', '.join(SCHEDULER_NAMES)}, or 'default' for the model's own",
    "width": "image width in pixels, a multiple of 8 (the embedded models draw 64)",
    "height": "image height in pixels, a multiple of 8 (the embedded models draw 64)",
    "seed": f"random seed from 0 to {MAX_SEED}; -1 picks one (image k of a batch uses seed + k)",
    "second_seed": "the seed the walk ends on",
    "number_of_images": "how many images to make",
    "show_trajectory": "true: also return each step's estimate of the final picture",
    "prompt_syntax": "'plain' (as diffusers: 77 tokens, brackets are text) or 'a1111' ((word:1.2), [word], BREAK, "
                     "long prompts)",
    "clip_skip": "use the text encoder's layer this many before its usual one (0: the usual; A1111's 2 is 1)",
    "lora_1": "a LoRA file the server offers ('' for none)",
    "lora_1_scale": "the first LoRA's strength (-4 to 4)",
    "lora_2": "a second LoRA file the server offers ('' for none)",
    "lora_2_scale": "the second LoRA's strength (-4 to 4)",
    "embeddings": "textual-inversion embeddings the server offers; write each one's file name in the prompt",
    "refiner": "an SDXL refiner to finish an SDXL base model's image ('' for none)",
    "high_noise_frac": "with a refiner: the share of the noise schedule the base model runs (0.05-0.95)",
    "fast": "true: the approximate fast path (its images differ slightly from the parity path's)",
    "deepcache": "fast path: run the whole UNet every N steps (0 off, 2 or 3)",
    "tome": "fast path: the share of tokens merged before self-attention (0 off, 0.5 or 0.75)",
    "guidance_until": "fast path: the share of the noise schedule guided; the prompt's pass alone after it (1 off, "
                      "0.8, 0.7 or 0.5)",
    "tgate": "fast path: T-GATE, the share of the noise schedule after which cross-attention is frozen and guidance "
             "stops (1 off, 0.8, 0.7 or 0.5)",
    "dit_cache": "fast path: FORA, the DiT's blocks recomputed every N steps, their outputs reused between (0 off, 2 "
                 "or 3)",
    "image": f"the starting image: {IMAGE}",
    "image_and_mask": "{'background': image file, 'layers': [mask image files: white or opaque pixels are "
                      "repainted], 'composite': null}",
    "strength": "how much to change the image, 0 (keep it) to 1 (ignore it)",
    "sample_posterior": "true: sample the VAE's posterior (with seed); false: take its mean",
    "class_label": "a class name or id (the embedded DiT: a colour and a shape, e.g. 'red circle')",
    "guided_channels": "'all' (diffusers' guidance) or 'first3' (the original DiT code's)",
    "kind": "the comparison: text_to_image, image_to_image, vae, dit, dit_timestep_semantics, precision, "
            "attention, fast_path or controlnet",
    "dtype": "precision compared against fp32: 'bf16' or 'fp16'",
    "png": "a PNG made by sd_core or AUTOMATIC1111, whose settings are read",
    "walk_between": "'seeds' (the starting noise blended) or 'prompts' (the text encodings blended)",
    "frames": "pictures along the walk, ends included",
    "x_type": "what the X axis varies (as A1111's X/Y/Z plot: Seed, Steps, CFG Scale, Sampler, Prompt S/R, ...)",
    "x_values": "the X axis's values: a comma list, or ranges like 1-5, 1-10 (+2), 10-20 [5]",
    "y_type": "what the Y axis varies ('Nothing' for none)",
    "y_values": "the Y axis's values",
    "z_type": "what the Z axis varies, one grid per value ('Nothing' for none)",
    "z_values": "the Z axis's values",
    "samplers": f"samplers to chart, from {', '.join(SCHEDULER_NAMES)}",
    "spacing": "timestep spacing: 'leading', 'trailing', 'linspace', or 'default' for the model's own",
    "karras": "true: Karras noise levels (for euler, dpmpp_2m, heun and lms)",
    "parity_grid": "true: also run every cell through diffusers on the same weights and mark it PASS/FAIL",
    "guess_mode": "true: the ControlNets see only the prompt's half of the guidance batch (diffusers' guess mode)",
}
for slot in (1, 2):
    PARAMETERS.update({
        f"controlnet_{slot}": f"ControlNet {slot}: a ControlNet the server offers ('' for none)",
        f"controlnet_{slot}_image": f"ControlNet {slot}'s control image or sketch: {IMAGE}",
        f"controlnet_{slot}_preprocessor": f"what makes ControlNet {slot}'s control image: 'none' (the image is the "
                                           "map), 'canny' (edges) or 'invert' (dark lines on light)",
        f"controlnet_{slot}_scale": f"ControlNet {slot}'s weight (0 to 2)",
        f"controlnet_{slot}_start": f"the share of the steps after which ControlNet {slot} starts acting (0 to 1)",
        f"controlnet_{slot}_end": f"the share of the steps after which ControlNet {slot} stops acting (0 to 1)"})


def documented(fn):
    """`fn` with its docstring followed by an "Args:" line for each of its parameters the glossary describes (in
    the signature's order), in the form gradio parses (one `name: meaning` line each)."""
    lines = [f"    {name}: {PARAMETERS[name]}" for name in inspect.signature(fn).parameters if name in PARAMETERS]
    if lines and "Args:" not in (fn.__doc__ or ""):
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "\n".join(lines)
    return fn
