"""The app's Compare tab: every kind of comparison, with the model list and the settings each kind takes.

sd_core never imports compare/: the comparisons (compare.kinds: KINDS, SD_KINDS, DIT_KINDS, run_comparison) are
handed in by app.py, which alone sees both."""
import shutil
import tempfile
from pathlib import Path

import gradio as gr
from gradio import processing_utils, utils

from sd_core.app.parts import (
    DEEPCACHE_CHOICES,
    LIMITS,
    MODELS,
    TOME_CHOICES,
    Settings,
    deepcache_of,
    drawn_side,
    handler,
    image_upload,
    images_gallery,
    model_choices,
    run_bounded,
    scheduler_dropdown,
    scheduler_of,
    timestep_semantics,
    tome_of,
)
from sd_core.app.serving import as_choice, as_text, numbers_choice, open_upload, raw_value
from sd_core.checkpoints.pipeline_classes import DiTPipeline
from sd_core.pipelines.settings import MAX_SEED, real_number, whole_number

MAX_COMPARE_STEPS = 50
EXAMPLE_SCENE = Path(__file__).resolve().parents[1] / "data" / "example-scene.png"


def compare_models_for(comparisons, kind: str) -> list:
    if kind in comparisons.SD_KINDS + ("fast_path",):
        return model_choices("text_to_image")
    return model_choices("dit" if kind in comparisons.DIT_KINDS else "any")


def compare_handler(comparisons):
    """The /compare endpoint over the given comparisons (the compare.kinds module)."""
    KINDS, SD_KINDS, DIT_KINDS = comparisons.KINDS, comparisons.SD_KINDS, comparisons.DIT_KINDS

    @handler
    def compare(kind, model, prompt="", negative_prompt="", class_label="0", image=None, strength=0.6, sample_posterior=False,
                guided_channels="all", dtype="bf16", seed=0, steps=4, scheduler="ddim", guidance_scale=5.0, deepcache=3,
                tome=0.0, progress=gr.Progress()):
        """sd_core beside diffusers (or beside itself under one changed choice) on the same weights and noise.
        Returns (verdict with a PASS/FAIL badge, images, plots, per-stage table, report as a zip)."""
        if kind not in KINDS:
            raise gr.Error(f"kind must be one of {list(KINDS)}; got {kind!r}.")
        if model not in dict(compare_models_for(comparisons, kind)).values() and not Settings.allow_hub:
            raise gr.Error(f"{model!r} does not fit the comparison {kind!r}: pick one of "
                           f"{list(dict(compare_models_for(comparisons, kind)).values())}.")
        pipe = MODELS.get(model, progress)
        dit = isinstance(pipe, DiTPipeline)
        if dit != (kind in DIT_KINDS) and kind in SD_KINDS + DIT_KINDS:
            raise gr.Error(f"{kind} compares {'DiT' if kind in DIT_KINDS else 'Stable Diffusion'} models; {model} is not one.")
        common = dict(seed=whole_number(seed, "seed", 0, MAX_SEED), steps=whole_number(steps, "steps", 1, MAX_COMPARE_STEPS),
                      scheduler=scheduler_of(scheduler), guidance_scale=real_number(guidance_scale, "guidance_scale", 0, 30))
        side = drawn_side(pipe)
        pixels, steps = side * side, common["steps"]
        if kind in ("vae", "image_to_image"):
            image = open_upload(image, max_pixels=LIMITS.max_upload_pixels)  # a bomb is refused from its header
            pixels = image.width * image.height
        if kind == "vae":
            settings, steps = dict(image=image, sample=bool(sample_posterior), seed=common["seed"]), 1
        elif dit:
            settings = dict(common, class_labels=[as_text(str(class_label), "class_label", 200)])
            if kind != "dit_timestep_semantics":
                settings["guided_channels"] = as_choice(guided_channels, "guided_channels", ["all", "first3"])
        else:
            settings = dict(common, prompt=as_text(prompt, "prompt"), negative_prompt=as_text(negative_prompt,
                                                                                              "negative_prompt") or None)
            if kind == "image_to_image":
                settings.update(image=image, strength=real_number(strength, "strength", 0.0, 1.0))
        if kind in ("precision", "attention"):
            settings["dtype"] = as_choice(dtype, "dtype", ["bf16", "fp16"]) if kind == "precision" else "fp32"
        if kind == "fast_path":
            settings.update(deepcache=deepcache_of(deepcache), tome=tome_of(tome))
        progress(0, desc=f"running {kind}")
        with MODELS.using(pipe):  # never while another request has a LoRA merged into these weights
            report = run_bounded(f"compare:{model}", pixels, steps, 1, lambda: comparisons.run_comparison(kind, pipe, **settings))
        badge = {True: "✅ PASS", False: "❌ FAIL", None: "📏 MEASUREMENT"}[report.passed]
        verdict = f"## {badge}\n{report.verdict}" + (f"\n\n{timestep_semantics(pipe)}" if dit else "")
        rows = [[s.name, f"{s.max_abs:.3g}", f"{s.relative:.3g}", f"{s.cosine:.8f}", f"{s.tolerance:.3g}",
                 "yes" if s.passed else "NO"] for s in report.stages]
        archive = report_archive(report, kind)
        images = [(image, caption) for caption, image in report.images.items()]
        plots = [(plot, name) for name, plot in report.plots.items()]
        return verdict, images, plots, rows, archive
    return compare


def report_archive(report, kind: str) -> str:
    """The report zipped into gradio's cache (which deletes it with the app's other results, by its delete_cache
    rule); the folder it was written in is removed at once."""
    with tempfile.TemporaryDirectory(prefix="sd_core-compare-") as folder:
        report.write(Path(folder) / kind)
        archive = shutil.make_archive(str(Path(folder) / f"sd_core-{kind}-report"), "zip", folder, kind)
        return processing_utils.save_file_to_cache(archive, cache_dir=utils.get_upload_folder())


COMPARE_FIELDS = {  # which settings each kind shows: prompt, class label, image, strength, sample, guided channels, dtype,
    # fast path, sampling (steps, scheduler, guidance: every kind that denoises)
    "text_to_image": "pt", "image_to_image": "pist", "vae": "im", "dit": "cgt", "dit_timestep_semantics": "ct",
    "precision": "pcdt", "attention": "pct", "fast_path": "pft", "controlnet": "pt"}
FIELD_FLAGS = "pcismgdpffttt"  # the flag of each component kind_fields updates, in its order


def kind_fields(comparisons, name: str) -> list:
    """The updates the Compare form gets when `name` is picked: the models that fit it, then each setting shown only
    where the kind reads it (prompt, class label, image, strength, sample, guided channels, dtype, negative prompt,
    DeepCache, ToMe, steps, scheduler, guidance)."""
    shown, choices = COMPARE_FIELDS[name], compare_models_for(comparisons, name)
    return [gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)] + [
        gr.update(visible=flag in shown) for flag in FIELD_FLAGS]


def compare_tab(comparisons):
    gr.Markdown("The same weights, inputs, seed and scheduler through sd_core and through diffusers (or through "
                "sd_core twice, one choice changed): the images, their difference, every step's and every module's error.")
    with gr.Row():
        with gr.Column():
            kind = gr.Dropdown([(f"{name}: {text}", name) for name, text in comparisons.KINDS.items()], value="text_to_image",
                               label="Kind of comparison")
            choices = compare_models_for(comparisons, "text_to_image")  # narrowed per kind; compare() checks the fit itself
            cmp_model = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Model", allow_custom_value=True)
            prompt = gr.Textbox("a small green triangle on the left on a white background", label="Prompt")
            negative = gr.Textbox("", label="Negative prompt")
            class_label = gr.Textbox("red circle", label="Class label (name or id)", visible=False)
            cmp_image = image_upload(label="Image", height=200, visible=False)  # on_kind fills it
            strength = gr.Slider(0, 1, 0.6, step=0.05, label="Strength", visible=False)
            sample = gr.Checkbox(False, label="Sample posterior (else its mean)", visible=False)
            guided = gr.Radio(["all", "first3"], value="all", label="Guided channels", visible=False)
            dtype = gr.Radio(["bf16", "fp16"], value="bf16", label="Dtype (against fp32)", visible=False)
            deepcache = numbers_choice(gr.Dropdown(DEEPCACHE_CHOICES, value=3,
                                              label="DeepCache interval (fast path)", visible=False))
            tome = numbers_choice(gr.Dropdown(TOME_CHOICES, value=0.0, label="ToMe: tokens merged (fast path)",
                                              visible=False))
            with gr.Row():
                cmp_seed = raw_value(gr.Number(0, label="Seed", precision=0))
                cmp_steps = raw_value(gr.Slider(1, MAX_COMPARE_STEPS, 10, step=1, label="Steps"))
            cmp_scheduler = scheduler_dropdown("ddim")
            cmp_guidance = raw_value(gr.Slider(0, 20, 5.0, step=0.5, label="Guidance scale"))
            strength = raw_value(strength)
            cmp_run = gr.Button("Compare", variant="primary")
        with gr.Column(elem_classes="results"):
            verdict = gr.Markdown(label="Verdict")
            cmp_images = images_gallery("Images: sd_core, reference, |difference| x gain", columns=4)
            plots = gr.Gallery(label="Plots: error per step, error per module", columns=1, height="auto", format="png",
                               object_fit="contain")
            report = gr.File(label="Report (zip: report.md, report.json, images, plots)")
    stages = gr.Dataframe(headers=["stage", "max |diff|", "relative", "cosine", "tolerance", "within"], wrap=True,
                          label="Per-stage error", max_height=600)
    def on_kind(name, image=None):
        """The kind's fields shown; an empty image field starts from the example scene (never an API default:
        gradio's API page showed that default as an unreachable URL)."""
        updates = kind_fields(comparisons, name)
        if "i" in COMPARE_FIELDS[name] and image is None:
            updates[1 + FIELD_FLAGS.index("i")] = gr.update(visible=True, value=str(EXAMPLE_SCENE))
        return updates
    kind.change(on_kind, [kind, cmp_image],
                [cmp_model, prompt, class_label, cmp_image, strength, sample, guided, dtype, negative, deepcache, tome,
                 cmp_steps, cmp_scheduler, cmp_guidance], api_name=False)
    cmp_run.click(compare_handler(comparisons), [kind, cmp_model, prompt, negative, class_label, cmp_image, strength, sample, guided, dtype,
                            cmp_seed, cmp_steps, cmp_scheduler, cmp_guidance, deepcache, tome],
                  [verdict, cmp_images, plots, stages, report], api_name="compare")
