"""Speed and memory of sd_core against diffusers: same weights, same inputs, one process, alternating.

    python -m compare benchmark                       # embedded models + real-size SD1.5/SDXL/DiT-XL/2, fp32 and bf16
    python -m compare benchmark --configs sd15 --dtypes fp32 --repeats 5 --json bench.json
    python -m compare benchmark --configs embedded,sd15 --dtypes fp32 --fast all   # add torch.compile rows (slow to build) and SDXL's fast rows (> 24 GB)
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

This file holds the model-level pairs each config builds, the run over them and the report; the whole-pipeline pairs
are compare.pipeline_pairs, the peers compare.peers, and how a pair is timed and its memory, work and peak share
counted is compare.measure.
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
from sd_core.pipelines.sampling import converted_copy
from sd_core.models.controlnet import ControlNetModel
from sd_core.models.unet import UNet2DConditionModel
from sd_core.models.vae import AutoencoderKL

from .peers import openvino_installed, openvino_unet_pair
from .pipeline_pairs import embedded_dit_pairs, embedded_pipeline_pairs, sd15_pipeline_pairs
from .twins import twin
from .measure import DTYPES, Pair, Row, count_flops, device, load_line, measure, peak_gflops, table, tensor_psnr
from .parity import quiet_diffusers

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


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

    def controlnet_pair():  # the same step steered by a ControlNet made from this UNet: what a ControlNet costs
        reference_controlnet = diffusers.ControlNetModel.from_unet(reference).eval().to(device(), dtype)
        controlnet = twin(ControlNetModel, reference_controlnet)
        hint = torch.rand(2, 3, 8 * latent, 8 * latent, generator=torch.Generator().manual_seed(1)).to(device(), dtype)

        def ours_step():
            down, mid = controlnet(sample, t, context, hint, added_cond_kwargs=added)
            return ours(sample, t, context, added, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid)

        def theirs_step():
            down, mid = reference_controlnet(sample, t, encoder_hidden_states=context, controlnet_cond=hint,
                                             added_cond_kwargs=added, return_dict=False)
            return reference(sample, t, encoder_hidden_states=context, added_cond_kwargs=added,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return Pair(ours_step, theirs_step)
    pairs["ControlNet + UNet step (batch 2)"] = controlnet_pair
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


def dit_pairs(dtype, latent: int, fast: str, config=None) -> dict:
    """The DiT transformer step, then the fast path's rows on the same weights: FORA over three steps (diffusers: the
    three steps), and a bf16 copy beside diffusers cast to bf16."""
    import diffusers

    from sd_core.fast.dit import FastDiT
    from sd_core.fast.options import FastOptions
    config = config or dit_config("DiT-XL/2", image_size=latent * 8)
    reference = diffusers.DiTTransformer2DModel(**config).eval().to(device(), dtype)
    ours = twin(DiTTransformer2DModel, reference)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, reference.config.in_channels, latent, latent, generator=generator).to(device(), dtype)
    y = torch.tensor([207, 1000], device=device()) % (reference.config.num_embeds_ada_norm + 1)
    t = torch.tensor([500, 500], device=device())
    plain = "transformer step (batch 2)"
    pairs = {plain: lambda: Pair(lambda: ours(x, t, y), lambda: reference(x, t, y).sample)}
    if fast == "none":
        return pairs

    def fora_pair(interval: int = 3):
        fast_ours = FastDiT(ours, FastOptions(bf16=False, dit_cache=interval))
        timesteps = [torch.tensor([500 - 25 * i] * 2, device=device()) for i in range(interval)]

        def ours_steps():
            fast_ours.reset()
            return [fast_ours(x, step, y) for step in timesteps]

        def psnr():
            return min(tensor_psnr(a, ours(x, step, y)) for a, step in zip(ours_steps(), timesteps))
        return Pair(ours_steps, lambda: [reference(x, step, y).sample for step in timesteps], psnr=psnr)
    pairs["fast: 3 transformer steps, FORA N=3 (diffusers: 3 steps)"] = fora_pair

    def bf16_pair():  # last: it casts the reference in place
        fast_ours = FastDiT(converted_copy(ours, torch.bfloat16), FastOptions(bf16=False))
        exact = ours(x, t, y)
        reference.to(torch.bfloat16)
        low = x.to(torch.bfloat16)
        return Pair(lambda: fast_ours(low, t, y), lambda: reference(low, t, y).sample, baseline=plain,
                    psnr=lambda: tensor_psnr(fast_ours(low, t, y), exact), dtype=torch.bfloat16)
    if dtype == torch.float32:
        pairs["fast: transformer step, bf16"] = bf16_pair
    return pairs


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
            # SDXL's fast rows hold the fp32 UNet, its converted copies and a ControlNet at once (over 24 GB with
            # the other jobs' leftovers: killed by the OOM killer on a 24 GB machine), so only `--fast all` adds them
            pairs.update(unet_pairs(presets.UNET_SDXL_BASE, dtype, latent, 2048, "default" if fast == "all" else "none"))
            pairs["text encoder 2 (bigG)"] = functools.partial(text_pair, presets.OPENCLIP_VIT_BIGG, dtype, True)
        elif config == "dit-xl-2":
            pairs.update(dit_pairs(dtype, latent, fast))
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

