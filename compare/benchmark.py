"""Speed and memory of sd_core against diffusers: same weights, same inputs, one process, alternating.

    python -m compare benchmark                       # embedded models + real-size SD1.5/SDXL/DiT-XL/2, fp32 and bf16
    python -m compare benchmark --configs sd15 --dtypes fp32 --repeats 5 --json bench.json
    python -m compare benchmark --configs embedded,sd15 --dtypes fp32 --fast all   # add torch.compile rows (slow to build)
    python -m compare benchmark --configs embedded-dit --dtypes fp32 --repeats 1    # the embedded DiT's rows alone (quick)

Each measurement is warmed up once, then the two implementations alternate for `repeats` rounds; the
table gives the fastest seconds (with the spread of the repeats) and the ratio sd_core / diffusers (below 1: sd_core is faster), and the peak
resident-memory growth during the call (CPU: sampled RSS after returning freed memory to the OS; GPU:
torch's peak allocation). Real-size configs use random weights (diffusers' init, shared with sd_core
without a copy) at small latent sizes. This is a measurement, never a test.

Each row also gives the work done (GFLOP per call, counted by torch.utils.flop_counter on the eager models, with
CPU flash attention counted as SDPA) and the achieved FLOP/s as a share of this machine's peak, measured in the
same run as the best square matmul (2048) in the dtype the row computes in, sampled before every row and at the end.
Rows marked "fast:" run sd_core's opt-in fast path (sd_core.fast.pipeline) beside diffusers with the same tricks applied to
its models (the same dtype, channels_last, and torch.compile where the row compiles): "ratio" is against that, and
"fast / diffusers default" against diffusers' plain fp32 run of the row the fast one speeds up. DeepCache has no
diffusers counterpart. Fast rows give the fast path's PSNR against sd_core's parity path (images, or the UNet/VAE
output for random weights). "sd15" ends with the whole pipeline (4 DPM++ 2M steps with CFG, random weights).
"embedded" and "embedded-dit" run the shipped text-to-image and DiT models end to end, with a row per opt-in that does
less work (guidance truncation by schedule and adaptive, the text cache off against on, FORA on the DiT). The load
average at the start and the end of the run, and of each row, is printed beside the figures: on a busy machine the
ratios swing.

This file holds what is measured (the pairs of calls each config builds, the run over them, the report); how a
pair is timed and its memory, work and peak share counted is compare.measure.
"""
import dataclasses
import functools
import json
import os
from pathlib import Path

import torch

from sd_core.models import presets
from sd_core.checkpoints.catalog import EMBEDDED_DIT, EMBEDDED_TEXT_TO_IMAGE
from sd_core.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sd_core.models.dit import DiTTransformer2DModel, dit_config
from sd_core.checkpoints.loading import on_meta
from sd_core.fast.precision import choose_precision
from sd_core.pipelines.sampling import converted_copy
from sd_core.models.unet import UNet2DConditionModel
from sd_core.models.vae import AutoencoderKL

from .peers import openvino_installed, openvino_unet_pair
from .measure import DTYPES, Pair, Row, count_flops, device, load_line, measure, peak_gflops, table, tensor_psnr
from .parity import quiet_diffusers

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def twin(ours_class, reference, config=None):
    """An sd_core model sharing the reference's tensors (no copy)."""
    with on_meta():
        model = ours_class.from_config(config or dict(reference.config))
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


def unet_inputs(reference, dtype, latent: int, context_dim: int):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, reference.config.in_channels, latent, latent, generator=generator).to(device(), dtype)
    context = torch.randn(2, 77, context_dim, generator=generator).to(device(), dtype)
    added = None
    if reference.config.addition_embed_type == "text_time":
        pooled = reference.config.projection_class_embeddings_input_dim - 6 * reference.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=generator).to(device(), dtype),
                 "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2).to(device(), dtype)}
    return sample, context, added


def unet_pairs(unet_config: dict, dtype, latent: int, context_dim: int, fast: str) -> dict:
    """The UNet step, then (built lazily, after the plain row) the fast-path rows on the same weights."""
    import diffusers

    from sd_core.fast.pipeline import FastOptions, FastUNet
    reference = diffusers.UNet2DConditionModel.from_config(unet_config).eval().to(device(), dtype)
    ours = twin(UNet2DConditionModel, reference)
    sample, context, added = unet_inputs(reference, dtype, latent, context_dim)
    t = torch.tensor(500, device=device())
    plain_ours = lambda: ours(sample, t, context, added)
    plain_theirs = lambda: reference(sample, t, encoder_hidden_states=context, added_cond_kwargs=added)
    exact = functools.cache(plain_ours)  # the parity output every fast row's PSNR is against, computed once
    plain = "UNet step (batch 2)"
    pairs = {plain: lambda: Pair(plain_ours, plain_theirs)}
    if fast == "none":
        return pairs
    if openvino_installed() and added is None and dtype == torch.float32 and device() == "cpu":
        def openvino_pair():  # before the rows that convert the reference in place
            fast_ours = FastUNet(converted_copy(ours, torch.bfloat16, channels_last=True), FastOptions(bf16=False))
            low = sample.to(torch.bfloat16), context.to(torch.bfloat16)
            return openvino_unet_pair(reference, lambda: fast_ours(low[0], t, low[1]), (sample, t, context), exact)
        pairs["peer: UNet step, sd_core fast bf16 + channels_last (diffusers column: OpenVINO, its CPU default)"] = \
            openvino_pair

    def channels_last_pair():  # from here on the reference is channels_last (and then bf16): the rows' order matters
        reference.to(memory_format=torch.channels_last)
        fast_ours = FastUNet(ours, FastOptions(bf16=False))
        return Pair(lambda: fast_ours(sample, t, context, added), plain_theirs, baseline=plain,
                    psnr=lambda: tensor_psnr(fast_ours(sample, t, context, added), exact()))
    pairs["fast: UNet step, channels_last"] = channels_last_pair

    if fast == "all":
        def compiled_pair():
            fast_ours = FastUNet(ours, FastOptions(bf16=False, compile=True))
            compiled = torch.compile(reference)
            return Pair(lambda: fast_ours(sample, t, context, added),
                        lambda: compiled(sample, t, encoder_hidden_states=context, added_cond_kwargs=added),
                        flops=(plain_ours, plain_theirs), baseline=plain,
                        psnr=lambda: tensor_psnr(fast_ours(sample, t, context, added), exact()))
        pairs["fast: UNet step, compile + channels_last"] = compiled_pair

    def deepcache_pair(interval: int = 3):
        fast_ours = FastUNet(ours, FastOptions(bf16=False, deepcache=interval))
        timesteps = [torch.tensor(500 - 25 * i, device=device()) for i in range(interval)]

        def ours_steps():
            fast_ours.reset()
            return [fast_ours(sample, step, context, added) for step in timesteps]

        def theirs_steps():
            return [reference(sample, step, encoder_hidden_states=context, added_cond_kwargs=added) for step in timesteps]

        def psnr():
            exact = [ours(sample, step, context, added) for step in timesteps]
            return min(tensor_psnr(a, b) for a, b in zip(ours_steps(), exact))
        return Pair(ours_steps, theirs_steps, psnr=psnr)
    pairs["fast: 3 UNet steps, channels_last + DeepCache N=3 (diffusers: 3 steps, channels_last)"] = deepcache_pair

    def bf16_pair():  # last: it casts the reference in place
        fast_ours = FastUNet(converted_copy(ours, torch.bfloat16, channels_last=True), FastOptions(bf16=False))
        reference.to(torch.bfloat16)
        low = [x if x is None else x.to(torch.bfloat16) for x in (sample, context)]
        low_added = added and {k: v.to(torch.bfloat16) for k, v in added.items()}
        return Pair(lambda: fast_ours(low[0], t, low[1], low_added),
                    lambda: reference(low[0], t, encoder_hidden_states=low[1], added_cond_kwargs=low_added),
                    psnr=lambda: tensor_psnr(fast_ours(low[0], t, low[1], low_added), exact()),
                    dtype=torch.bfloat16, baseline=plain)
    def tome_pair():  # after bf16_pair: the reference is bf16 + channels_last by now
        fast_ours = FastUNet(converted_copy(ours, torch.bfloat16, channels_last=True),
                             FastOptions(bf16=False, tome=0.5))
        low = sample.to(torch.bfloat16), context.to(torch.bfloat16)
        return Pair(lambda: fast_ours(low[0], t, low[1], added), lambda: reference(low[0], t, encoder_hidden_states=low[1]),
                    psnr=lambda: tensor_psnr(fast_ours(low[0], t, low[1], added), exact()),
                    dtype=torch.bfloat16, baseline=plain)
    if dtype == torch.float32:
        pairs["fast: UNet step, bf16 + channels_last"] = bf16_pair
        if added is None:  # ToMe wraps SD 1.x/2.x blocks here
            pairs["fast: UNet step, bf16 + channels_last + ToMe 0.5"] = tome_pair
    return pairs


def vae_pairs(vae_config: dict, dtype, latent: int, fast: str) -> dict:
    """The VAE decode, then the fast path's channels_last and bf16 decodes beside diffusers' with the same tricks."""
    import diffusers

    from sd_core.fast.pipeline import FastDecoder, FastOptions
    reference = diffusers.AutoencoderKL.from_config(vae_config).eval().to(device(), dtype)
    ours = twin(AutoencoderKL, reference)
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device(), dtype)
    plain = f"VAE decode ({latent * 8}px)"
    pairs = {plain: lambda: Pair(lambda: ours.decode(z), lambda: reference.decode(z).sample)}
    if fast == "none":
        return pairs

    def fast_pair(low: bool):  # converts the reference in place: channels_last, then bf16
        reference.to(memory_format=torch.channels_last)
        fast_ours = FastDecoder(ours, FastOptions(bf16=False), converted_copy(ours, torch.bfloat16, channels_last=True) if low else None)
        if low:
            reference.to(torch.bfloat16)
        theirs_z = z.to(torch.bfloat16) if low else z
        return Pair(lambda: fast_ours.decode(z), lambda: reference.decode(theirs_z).sample, baseline=plain,
                    psnr=lambda: tensor_psnr(fast_ours.decode(z), ours.decode(z)), dtype=torch.bfloat16 if low else None)
    pairs[f"fast: VAE decode ({latent * 8}px), channels_last"] = functools.partial(fast_pair, False)
    if dtype == torch.float32:
        pairs[f"fast: VAE decode ({latent * 8}px), bf16 + channels_last"] = functools.partial(fast_pair, True)
    return pairs


def text_pair(text_config: dict, dtype, projected: bool) -> Pair:
    import transformers
    reference_class = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
    reference = reference_class(transformers.CLIPTextConfig(**text_config)).eval().to(device(), dtype)
    ours = twin(CLIPTextModelWithProjection if projected else CLIPTextModel, reference, reference.config.to_dict())
    ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(0)).to(device())
    return Pair(lambda: ours(ids, output_hidden_states=True), lambda: reference(ids, output_hidden_states=True))


def dit_pair(dtype, latent: int) -> Pair:
    import diffusers
    reference = diffusers.DiTTransformer2DModel(**dit_config("DiT-XL/2", image_size=latent * 8)).eval().to(device(), dtype)
    ours = twin(DiTTransformer2DModel, reference)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=generator).to(device(), dtype)
    t, y = torch.tensor([500, 500], device=device()), torch.tensor([207, 1000], device=device())
    return Pair(lambda: ours(x, t, y), lambda: reference(x, t, y).sample)


EMBEDDED_PROMPT = "a small red circle on the left on a gray background"


def trick_names(fast_options: dict, dtype: torch.dtype) -> str:
    names = [{torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")]
    names += [name for name in ("compile", "freeze", "channels_last") if fast_options.get(name, name == "channels_last")]
    names += [f"DeepCache N={fast_options['deepcache']}"] if fast_options.get("deepcache", 0) > 1 else []
    names += [f"FORA N={fast_options['dit_cache']}"] if fast_options.get("dit_cache", 0) > 1 else []
    names += [f"guidance until {fast_options['guidance_until']:g}"] if "guidance_until" in fast_options else []
    names += [f"guidance until cos >= {fast_options['guidance_similarity']:g}"] \
        if "guidance_similarity" in fast_options else []
    names += [f"T-GATE after {fast_options['tgate']:g}"] if "tgate" in fast_options else []
    names += ["no text cache"] if fast_options.get("text_cache") == 0 else []
    return " + ".join(names)


def pipeline_pairs(ours, diffusers_pipeline, prompt: str, options: dict, fast: str, variants: list[dict]) -> dict:
    """sd_core's text_to_image vs diffusers' pipeline on the same weights; then, per fast-path variant, sd_core's
    fast path beside diffusers' pipeline with the same tricks: the same dtype, channels_last UNet and VAE, and
    torch.compile where the variant compiles (DeepCache alone has no diffusers counterpart).
    `diffusers_pipeline(dtype)` gives the pipeline in that dtype (a fresh one, or the one converted in place)."""
    import numpy as np

    from sd_core.fast.pipeline import make_fast
    from sd_core.pipelines.image_io import psnr
    from sd_core.pipelines.generate import text_to_image
    size = options.get("height") or ours.default_size
    name = f"pipeline ({options['steps']} steps, CFG, {size} px)"
    run_ours = lambda: text_to_image(ours, prompt, **options)

    def run_theirs(pipe):
        return lambda: pipe(prompt, num_inference_steps=options["steps"], guidance_scale=options["guidance_scale"],
                            height=size, width=size, generator=torch.Generator().manual_seed(options["seed"])).images

    pairs = {name: lambda: Pair(run_ours, run_theirs(diffusers_pipeline(torch.float32)))}
    if fast == "none":
        return pairs

    def fast_pair(fast_options: dict):
        fast_pipe = make_fast(ours, **fast_options)
        theirs = diffusers_pipeline(fast_pipe.dtype)  # diffusers' way: the whole pipeline in that dtype
        theirs.unet.to(memory_format=torch.channels_last)
        theirs.vae.to(memory_format=torch.channels_last)
        if fast_options.get("compile"):  # the same compile for diffusers, inductor's freezing included
            theirs.unet = torch.compile(theirs.unet, options={"freezing": True} if fast_options.get("freeze") else None)
        fast_run = lambda: fast_pipe.text_to_image(prompt, **options)
        eager = make_fast(ours, **{**fast_options, "compile": False})
        return Pair(fast_run, run_theirs(theirs), flops=(lambda: eager.text_to_image(prompt, **options), run_theirs(theirs)),
                    psnr=lambda: psnr(np.asarray(fast_run().images[0]), np.asarray(parity_image())),
                    dtype=fast_pipe.dtype, baseline=name)

    @functools.cache
    def parity_image():
        return run_ours().images[0]
    compiled = [{"bf16": False, "compile": True}, {"bf16": False, "compile": True, "freeze": True}]
    for fast_options in variants + (compiled if fast == "all" else []):
        dtype = choose_precision(fast_options["bf16"], torch.float32, device()).dtype
        pairs[f"fast: pipeline, {trick_names(fast_options, dtype)}"] = functools.partial(fast_pair, fast_options)
    return pairs


def embedded_pipeline_pairs(fast: str, steps: int = 20) -> dict:
    """The shipped text-to-image model end to end (a fresh diffusers pipeline for every row)."""
    import diffusers

    from sd_core.checkpoints.loading import load_pipeline

    def diffusers_pipeline(dtype):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(EMBEDDED_TEXT_TO_IMAGE, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device(), dtype)

    variants = [{"bf16": False, "text_cache": 0}, {"bf16": False}, {"bf16": False, "deepcache": 2},
                {"bf16": False, "deepcache": 3}, {"bf16": False, "guidance_until": 0.8},
                {"bf16": False, "guidance_similarity": 0.999}, {"bf16": False, "tgate": 0.5}, {"bf16": True}]
    return pipeline_pairs(load_pipeline(EMBEDDED_TEXT_TO_IMAGE, device=device()), diffusers_pipeline,
                          EMBEDDED_PROMPT, {"steps": steps, "seed": 0, "guidance_scale": 5.0}, fast, variants)


def embedded_dit_pairs(fast: str, steps: int = 20) -> dict:
    """The shipped DiT end to end: sd_core's dit_sample beside diffusers' DiTPipeline on the same folder (two classes,
    guided), then the fast path's rows beside diffusers in the same dtype; PSNR: the worse image's."""
    import diffusers
    import numpy as np

    from sd_core.checkpoints.loading import load_pipeline
    from sd_core.fast.pipeline import make_fast
    from sd_core.pipelines.generate import dit_sample
    from sd_core.pipelines.image_io import psnr
    ours = load_pipeline(EMBEDDED_DIT, device=device())
    labels, options = [0, 7], {"steps": steps, "seed": 0, "guidance_scale": 3.0}

    def run_theirs(dtype):
        pipe = diffusers.DiTPipeline.from_pretrained(EMBEDDED_DIT, local_files_only=True).to(device(), dtype)
        pipe.set_progress_bar_config(disable=True)
        return lambda: pipe(labels, guidance_scale=options["guidance_scale"], num_inference_steps=steps,
                            generator=torch.Generator().manual_seed(options["seed"])).images
    run_ours = lambda: dit_sample(ours, labels, **options)
    parity = functools.cache(lambda: run_ours().images)
    name = f"DiT pipeline ({steps} steps, CFG, 2 images)"
    pairs = {name: lambda: Pair(run_ours, run_theirs(torch.float32))}

    def fast_pair(fast_options: dict):
        fast_pipe = make_fast(ours, **fast_options)
        run = lambda: fast_pipe.dit_sample(labels, **options)
        worst = lambda: min(psnr(np.asarray(a), np.asarray(b)) for a, b in zip(run().images, parity()))
        return Pair(run, run_theirs(fast_pipe.dtype), psnr=worst, dtype=fast_pipe.dtype, baseline=name)
    variants = [{"bf16": False, "dit_cache": 2}, {"bf16": False, "dit_cache": 3}, {"bf16": False, "guidance_until": 0.7},
                {"bf16": "auto"}]
    for fast_options in variants if fast != "none" else []:
        dtype = choose_precision(fast_options["bf16"], torch.float32, device()).dtype
        pairs[f"fast: DiT, {trick_names(fast_options, dtype)}"] = functools.partial(fast_pair, fast_options)
    return pairs


def sd15_diffusers_pipeline():
    """A real-size SD 1.5 diffusers pipeline with random weights (diffusers' init) and the CLIP tokenizer, on the
    device, DPM++ 2M."""
    import diffusers
    import transformers
    unet = diffusers.UNet2DConditionModel.from_config(presets.UNET_SD15).eval()
    vae = diffusers.AutoencoderKL.from_config(presets.VAE_SD).eval()
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**presets.CLIP_VIT_L)).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(EMBEDDED_TEXT_TO_IMAGE / "tokenizer")
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(presets.SCHEDULER_SD)
    theirs = diffusers.StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False).to(device())
    theirs.set_progress_bar_config(disable=True)
    return theirs


def sd_core_twin(theirs):
    """sd_core's pipeline sharing a diffusers SD 1.x pipeline's tensors (no copy)."""
    from sd_core.checkpoints.pipeline_classes import StableDiffusionPipeline
    from sd_core.tokenizer import CLIPTokenizer
    return StableDiffusionPipeline("sd1", twin(UNet2DConditionModel, theirs.unet), twin(AutoencoderKL, theirs.vae),
                                   dict(theirs.scheduler.config),
                                   twin(CLIPTextModel, theirs.text_encoder, theirs.text_encoder.config.to_dict()),
                                   CLIPTokenizer(EMBEDDED_TEXT_TO_IMAGE / "tokenizer"))


def sd15_pipeline_pairs(fast: str, latent: int, steps: int = 4) -> dict:
    """A real-size SD 1.5 pipeline end to end (random weights, shared by both stacks) at `latent` * 8 px with
    DPM++ 2M. One diffusers pipeline: the fast rows convert it in place, so they come last."""
    theirs = sd15_diffusers_pipeline()
    ours = sd_core_twin(theirs)
    options = {"steps": steps, "seed": 0, "guidance_scale": 7.5, "height": latent * 8, "width": latent * 8,
               "scheduler": "dpmpp_2m"}
    variants = [{"bf16": "auto"}, {"bf16": "auto", "deepcache": 2}, {"bf16": "auto", "tgate": 0.5},
                {"bf16": "auto", "deepcache": 2, "tgate": 0.5}]  # the hardware's precision, as make_fast chooses
    return pipeline_pairs(ours, lambda dtype: theirs.to(device(), dtype), "a photograph of an astronaut riding a horse",
                          options, fast, variants)


def run(jobs: list[tuple[str, str]], repeats: int, latent: int = 32, fast: str = "default") -> list[Row]:
    """The rows of every (dtype, config) job."""
    rows = []
    for dtype_name, config in jobs:
        dtype = DTYPES[dtype_name]
        peak = peak_gflops(dtype)
        print(f"peak {dtype_name} matmul: {peak:.1f} GFLOP/s", flush=True)
        pairs = {}  # what -> a zero-argument factory of a Pair, built just before it is measured
        if config == "embedded":
            if dtype_name == "fp32" and EMBEDDED_TEXT_TO_IMAGE.is_dir():
                pairs.update(embedded_pipeline_pairs(fast))
        elif config == "embedded-dit":
            if dtype_name == "fp32" and EMBEDDED_DIT.is_dir():
                pairs.update(embedded_dit_pairs(fast))
        elif config == "sd15":
            pairs.update(unet_pairs(presets.UNET_SD15, dtype, latent, 768, fast))
            pairs["text encoder (CLIP-L)"] = functools.partial(text_pair, presets.CLIP_VIT_L, dtype, False)
            pairs.update(vae_pairs(presets.VAE_SD, dtype, latent, fast))
            if dtype == torch.float32:
                pairs.update(sd15_pipeline_pairs(fast, latent))
        elif config == "sdxl":
            pairs.update(unet_pairs(presets.UNET_SDXL_BASE, dtype, latent, 2048, "none"))
            pairs["text encoder 2 (bigG)"] = functools.partial(text_pair, presets.OPENCLIP_VIT_BIGG, dtype, True)
        elif config == "dit-xl-2":
            pairs["transformer step (batch 2)"] = functools.partial(dit_pair, dtype, latent)
        plain = {}  # this job's rows by name: a fast row's "diffusers default" is its baseline's diffusers time
        for what, factory in pairs.items():
            pair = factory()
            peak = peak_gflops(pair.dtype or dtype)  # against the peak of the dtype the row computes in
            flops = pair.flops or (pair.ours, pair.theirs)
            row = measure(config, DTYPE_NAMES[pair.dtype or dtype], what, pair.ours, pair.theirs, repeats)
            row.sd_core_gflop, row.diffusers_gflop = count_flops(flops[0]), count_flops(flops[1])
            row.peak_gflops = peak
            with torch.no_grad():
                row.psnr = pair.psnr and pair.psnr()
                row.peer_psnr = pair.peer_psnr and pair.peer_psnr()
            if pair.baseline in plain:
                row.vs_default = row.sd_core_s / plain[pair.baseline].diffusers_s
            plain[what] = row
            print(f"{row.config:9} {row.dtype:5} {row.what:28} sd_core {row.sd_core_s:8.3f}s  diffusers "
                  f"{row.diffusers_s:8.3f}s  ratio {row.ratio:5.2f}  {row.sd_core_gflop:9.1f} GFLOP  "
                  f"{row.peak_share(row.sd_core_gflop, row.sd_core_s):5.1f}% of peak"
                  + (f"  PSNR {row.psnr:.1f} dB" if row.psnr is not None else "")
                  + (f"  vs diffusers default {row.vs_default:.2f}" if row.vs_default is not None else "")
                  + f"  load {row.load_start:.1f}->{row.load_end:.1f}", flush=True)
            rows.append(row)
            del pair
        del pairs
    return rows


def main(args):
    """One process, or under accelerate launch / torchrun a share of the (dtype, config) jobs per process (each on
    its own device), the rows gathered and printed by the main process."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from sd_core.training.distributed import cpu_only, finish
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    state = PartialState(cpu=cpu_only())
    jobs = [(dtype, config) for dtype in args.dtypes.split(",") for config in args.configs.split(",")]
    args.load_at_start = os.getloadavg()
    # quiet_diffusers: diffusers' "modules that should be kept in float32: []" notice on every cast names no module
    with state.split_between_processes(jobs) as share, quiet_diffusers():
        rows = run(share, args.repeats, args.latent, getattr(args, "fast", "default"))
    if state.num_processes > 1:
        rows = gather_object(rows)
    if state.is_main_process:
        report(rows, args)
    finish(state)


def report(rows: list[Row], args):
    """The table (and --json) of every row, against the best peak each dtype reached."""
    for row in rows:  # every share against the best peak the whole run saw
        row.peak_gflops = peak_gflops(DTYPES[row.dtype])
    print()
    print(f"device: {device()}, torch {torch.__version__}, threads {torch.get_num_threads()}; peak matmul GFLOP/s: "
          + ", ".join(f"{name} {peak_gflops(DTYPES[name]):.1f}" for name in sorted({row.dtype for row in rows})))
    print(load_line(args.load_at_start, os.getloadavg()))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows], indent=2))

