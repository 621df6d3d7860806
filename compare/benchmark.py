"""Speed and memory of sd_core against diffusers: same weights, same inputs, one process, alternating.

    python -m compare benchmark                       # embedded models + real-size SD1.5/SDXL/DiT-XL/2, fp32 and bf16
    python -m compare benchmark --configs sd15 --dtypes fp32 --repeats 5 --json bench.json
    python -m compare benchmark --configs embedded,sd15 --dtypes fp32 --fast all   # add torch.compile rows (slow to build)

Each measurement is warmed up once, then the two implementations alternate for `repeats` rounds; the
table gives median seconds and the ratio sd_core / diffusers (below 1: sd_core is faster), and the peak
resident-memory growth during the call (CPU: sampled RSS after returning freed memory to the OS; GPU:
torch's peak allocation). Real-size configs use random weights (diffusers' init, shared with sd_core
without a copy) at small latent sizes. This is a measurement, never a test.

Each row also gives the work done (GFLOP per call, counted by torch.utils.flop_counter on the eager models, with
CPU flash attention counted as SDPA) and the achieved FLOP/s as a share of this machine's peak, measured in the
same run as the best square matmul (2048) in the row's dtype, sampled before every row and at the end. Rows marked "fast:" run sd_core's opt-in
fast path (sd_core.fast) beside diffusers with the same tricks applied to its models (channels_last, and
torch.compile); DeepCache has no diffusers counterpart (there it runs the plain model), and its rows show the
fast path's PSNR against sd_core's parity path (images, or the UNet output for random weights).
"""
import copy
import ctypes
import dataclasses
import functools
import json
import math
import statistics
import threading
import time
from pathlib import Path

import torch
from torch.utils import flop_counter

from sd_core import presets
from sd_core.catalog import EMBEDDED_TEXT_TO_IMAGE
from sd_core.clip import CLIPTextModel, CLIPTextModelWithProjection
from sd_core.dit import DiTTransformer2DModel, dit_config
from sd_core.loading import on_meta
from sd_core.unet import UNet2DConditionModel
from sd_core.vae import AutoencoderKL

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class PeakMemory:
    """Peak memory growth during a block: torch's allocator on a GPU, sampled RSS on the CPU."""

    def __enter__(self):
        if device() == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back so the growth is visible
        except OSError:
            pass
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if device() == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, rss()) - self.base


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@dataclasses.dataclass
class Row:
    config: str
    dtype: str
    what: str
    sd_core_s: float
    diffusers_s: float
    sd_core_mb: float
    diffusers_mb: float
    sd_core_gflop: float = 0.0  # work per call, counted on the eager models
    diffusers_gflop: float = 0.0
    peak_gflops: float = 0.0  # this machine's measured matmul peak in this dtype
    psnr: float | None = None  # fast rows: sd_core fast path against sd_core's parity path

    @property
    def ratio(self) -> float:
        return self.sd_core_s / self.diffusers_s

    def peak_share(self, gflop: float, seconds: float) -> float:
        return 100 * gflop / seconds / self.peak_gflops if self.peak_gflops else 0.0


def sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def count_flops(fn) -> float:
    """GFLOP of one call (matmuls, convolutions, attention), by torch's flop counter."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops}
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops() / 1e9


PEAKS: dict = {}  # dtype -> the best GFLOP/s any peak measurement in this run reached


def peak_gflops(dtype: torch.dtype, n: int = 2048, tries: int = 6) -> float:
    """This machine's attainable GFLOP/s in `dtype`: the best n x n matmul seen in this run. Measured again
    before every row (a shared machine throttles single measurements), so the table's shares use the best."""
    a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)).to(device(), dtype) for i in (0, 1))
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        a @ b
        if device() == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    PEAKS[dtype] = max(PEAKS.get(dtype, 0.0), 2 * n ** 3 / best / 1e9)
    return PEAKS[dtype]


@dataclasses.dataclass
class Pair:
    """Two zero-argument callables to time; `flops` the eager callables to count (when ours/theirs are
    compiled), `psnr` a function giving the fast path's PSNR against the parity path (fast rows)."""
    ours: object
    theirs: object
    flops: tuple | None = None
    psnr: object = None


def measure(config: str, dtype: str, what: str, ours, theirs, repeats: int) -> Row:
    """Median time and peak memory of two zero-argument callables, alternating after one warm-up each."""
    times, memory = {"ours": [], "theirs": []}, {"ours": 0, "theirs": 0}
    with torch.no_grad():
        ours(), theirs()
        for r in range(repeats):
            order = [("ours", ours), ("theirs", theirs)] if r % 2 == 0 else [("theirs", theirs), ("ours", ours)]
            for name, fn in order:
                with PeakMemory() as peak:
                    start = time.perf_counter()
                    fn()
                    if device() == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
                memory[name] = max(memory[name], peak.bytes)
    return Row(config, dtype, what, statistics.median(times["ours"]), statistics.median(times["theirs"]),
               memory["ours"] / 2 ** 20, memory["theirs"] / 2 ** 20)


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

    from sd_core.fast import FastOptions, FastUNet
    reference = diffusers.UNet2DConditionModel.from_config(unet_config).eval().to(device(), dtype)
    ours = twin(UNet2DConditionModel, reference)
    sample, context, added = unet_inputs(reference, dtype, latent, context_dim)
    t = torch.tensor(500, device=device())
    plain_ours = lambda: ours(sample, t, context, added)
    plain_theirs = lambda: reference(sample, t, encoder_hidden_states=context, added_cond_kwargs=added)
    pairs = {"UNet step (batch 2)": lambda: Pair(plain_ours, plain_theirs)}
    if fast == "none":
        return pairs

    def channels_last_pair():
        reference.to(memory_format=torch.channels_last)
        fast_ours = FastUNet(ours, FastOptions(bf16=False))
        return Pair(lambda: fast_ours(sample, t, context, added), plain_theirs,
                    psnr=lambda: tensor_psnr(fast_ours(sample, t, context, added), plain_ours()))
    pairs["fast: UNet step, channels_last"] = channels_last_pair

    if fast == "all":
        def compiled_pair():
            fast_ours = FastUNet(ours, FastOptions(bf16=False, compile=True))
            compiled = torch.compile(reference)
            return Pair(lambda: fast_ours(sample, t, context, added),
                        lambda: compiled(sample, t, encoder_hidden_states=context, added_cond_kwargs=added),
                        flops=(plain_ours, plain_theirs),
                        psnr=lambda: tensor_psnr(fast_ours(sample, t, context, added), plain_ours()))
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
    pairs["fast: 3 UNet steps, DeepCache N=3 (diffusers: plain)"] = deepcache_pair

    def bf16_pair():  # last: it casts the reference in place
        fast_ours = FastUNet(copy.deepcopy(ours).to(torch.bfloat16), FastOptions(bf16=False))
        reference.to(torch.bfloat16)
        low = [x if x is None else x.to(torch.bfloat16) for x in (sample, context)]
        low_added = added and {k: v.to(torch.bfloat16) for k, v in added.items()}
        return Pair(lambda: fast_ours(low[0], t, low[1], low_added),
                    lambda: reference(low[0], t, encoder_hidden_states=low[1], added_cond_kwargs=low_added),
                    psnr=lambda: tensor_psnr(fast_ours(low[0], t, low[1], low_added), plain_ours()))
    if dtype == torch.float32:
        pairs["fast: UNet step, bf16 + channels_last (diffusers: bf16 + channels_last)"] = bf16_pair
    return pairs


def tensor_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of `a` against `b` over b's range (for model outputs, which have no fixed scale)."""
    a, b = a.float(), b.float()
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(float(b.max() - b.min()) ** 2 / mse)


def vae_pairs(vae_config: dict, dtype, latent: int, fast: str) -> dict:
    import diffusers

    from sd_core.fast import FastDecoder, FastOptions
    reference = diffusers.AutoencoderKL.from_config(vae_config).eval().to(device(), dtype)
    ours = twin(AutoencoderKL, reference)
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device(), dtype)
    pairs = {f"VAE decode ({latent * 8}px)": lambda: Pair(lambda: ours.decode(z), lambda: reference.decode(z).sample)}
    if fast != "none":
        def channels_last_pair():
            reference.to(memory_format=torch.channels_last)
            fast_ours = FastDecoder(ours, FastOptions(bf16=False))
            return Pair(lambda: fast_ours.decode(z), lambda: reference.decode(z).sample,
                        psnr=lambda: tensor_psnr(fast_ours.decode(z), ours.decode(z)))
        pairs[f"fast: VAE decode ({latent * 8}px), channels_last"] = channels_last_pair
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


def embedded_pipeline_pairs(fast: str, steps: int = 20) -> dict:
    """The shipped text-to-image model end to end: sd_core's text_to_image vs diffusers' pipeline; then the fast
    path beside diffusers' pipeline with the same tricks on its UNet and VAE."""
    import diffusers
    import numpy as np

    from sd_core.fast import make_fast
    from sd_core.images import psnr
    from sd_core.loading import load_pipeline
    from sd_core.pipelines import text_to_image
    ours = load_pipeline(EMBEDDED_TEXT_TO_IMAGE, device=device())

    def diffusers_pipeline():
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(EMBEDDED_TEXT_TO_IMAGE, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device())

    options = {"steps": steps, "seed": 0, "guidance_scale": 5.0}
    run_ours = lambda: text_to_image(ours, EMBEDDED_PROMPT, **options)

    def run_theirs(pipe):
        return lambda: pipe(EMBEDDED_PROMPT, num_inference_steps=steps, guidance_scale=5.0,
                            generator=torch.Generator().manual_seed(0)).images

    plain = diffusers_pipeline()
    pairs = {f"pipeline ({steps} steps, CFG)": lambda: Pair(run_ours, run_theirs(plain))}
    if fast == "none":
        return pairs

    def fast_pair(compiled: bool = False, **fast_options):
        fast_options.setdefault("bf16", False)
        fast_pipe = make_fast(ours, compile=compiled, **fast_options)
        theirs = diffusers_pipeline()
        if fast_options.get("bf16"):
            theirs.to(torch.bfloat16)  # diffusers' way: the whole pipeline (its UNet input follows the text encoder's dtype)
        if "deepcache" not in fast_options:
            theirs.unet.to(memory_format=torch.channels_last)
            theirs.vae.to(memory_format=torch.channels_last)
            if compiled:
                theirs.unet = torch.compile(theirs.unet)
        fast_run = lambda: fast_pipe.text_to_image(EMBEDDED_PROMPT, **options)
        eager = make_fast(ours, **fast_options)
        reference = run_ours().images[0]
        return Pair(fast_run, run_theirs(theirs),
                    flops=(lambda: eager.text_to_image(EMBEDDED_PROMPT, **options), run_theirs(plain)),
                    psnr=lambda: psnr(np.asarray(fast_run().images[0]), np.asarray(reference)))
    pairs["fast: pipeline, channels_last"] = fast_pair
    if fast == "all":
        pairs["fast: pipeline, compile + channels_last"] = lambda: fast_pair(compiled=True)
    for interval in (2, 3):
        pairs[f"fast: pipeline, DeepCache N={interval} (diffusers: plain)"] = functools.partial(fast_pair, deepcache=interval)
    pairs["fast: pipeline, bf16 UNet + channels_last (diffusers: all bf16 + channels_last)"] = functools.partial(fast_pair, bf16=True)
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
        elif config == "sd15":
            pairs.update(unet_pairs(presets.UNET_SD15, dtype, latent, 768, fast))
            pairs["text encoder (CLIP-L)"] = functools.partial(text_pair, presets.CLIP_VIT_L, dtype, False)
            pairs.update(vae_pairs(presets.VAE_SD, dtype, latent, fast))
        elif config == "sdxl":
            pairs.update(unet_pairs(presets.UNET_SDXL_BASE, dtype, latent, 2048, "none"))
            pairs["text encoder 2 (bigG)"] = functools.partial(text_pair, presets.OPENCLIP_VIT_BIGG, dtype, True)
        elif config == "dit-xl-2":
            pairs["transformer step (batch 2)"] = functools.partial(dit_pair, dtype, latent)
        for what, factory in pairs.items():
            peak = peak_gflops(dtype)
            pair = factory()
            flops = pair.flops or (pair.ours, pair.theirs)
            row = measure(config, dtype_name, what, pair.ours, pair.theirs, repeats)
            row.sd_core_gflop, row.diffusers_gflop = count_flops(flops[0]), count_flops(flops[1])
            row.peak_gflops = peak
            if pair.psnr is not None:
                with torch.no_grad():
                    row.psnr = pair.psnr()
            print(f"{row.config:9} {row.dtype:5} {row.what:28} sd_core {row.sd_core_s:8.3f}s  diffusers "
                  f"{row.diffusers_s:8.3f}s  ratio {row.ratio:5.2f}  {row.sd_core_gflop:9.1f} GFLOP  "
                  f"{row.peak_share(row.sd_core_gflop, row.sd_core_s):5.1f}% of peak"
                  + (f"  PSNR {row.psnr:.1f} dB" if row.psnr is not None else ""), flush=True)
            rows.append(row)
            del pair
        del pairs
    return rows


def table(rows: list[Row]) -> str:
    lines = [("| config | dtype | measurement | sd_core (s) | diffusers (s) | ratio | sd_core GFLOP | sd_core % of peak "
              "| diffusers GFLOP | diffusers % of peak | PSNR vs parity (dB) | sd_core peak MB | diffusers peak MB |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.config} | {r.dtype} | {r.what} | {r.sd_core_s:.3f} | {r.diffusers_s:.3f} | {r.ratio:.2f} | "
              f"{r.sd_core_gflop:.1f} | {r.peak_share(r.sd_core_gflop, r.sd_core_s):.1f} | {r.diffusers_gflop:.1f} | "
              f"{r.peak_share(r.diffusers_gflop, r.diffusers_s):.1f} | "
              f"{'' if r.psnr is None else f'{r.psnr:.1f}'} | {r.sd_core_mb:.0f} | {r.diffusers_mb:.0f} |" for r in rows]
    return "\n".join(lines)


def main(args):
    """One process, or under accelerate launch / torchrun a share of the (dtype, config) jobs per process (each on
    its own device), the rows gathered and printed by the main process."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from sd_core.distributed import cpu_only, finish
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    state = PartialState(cpu=cpu_only())
    jobs = [(dtype, config) for dtype in args.dtypes.split(",") for config in args.configs.split(",")]
    with state.split_between_processes(jobs) as share:
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
          + ", ".join(f"{name} {PEAKS.get(DTYPES[name]) or peak_gflops(DTYPES[name]):.1f}"
                      for name in args.dtypes.split(",")))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows], indent=2))
