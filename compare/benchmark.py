"""Speed and memory of sd_core against diffusers: same weights, same inputs, one process, alternating.

    python -m compare benchmark                       # embedded models + real-size SD1.5/SDXL/DiT-XL/2, fp32 and bf16
    python -m compare benchmark --configs sd15 --dtypes fp32 --repeats 5 --json bench.json

Each measurement is warmed up once, then the two implementations alternate for `repeats` rounds; the
table gives median seconds and the ratio sd_core / diffusers (below 1: sd_core is faster), and the peak
resident-memory growth during the call (CPU: sampled RSS after returning freed memory to the OS; GPU:
torch's peak allocation). Real-size configs use random weights (diffusers' init, shared with sd_core
without a copy) at small latent sizes. This is a measurement, never a test.
"""
import ctypes
import dataclasses
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from sd_core import presets
from sd_core.clip import CLIPTextModel, CLIPTextModelWithProjection
from sd_core.dit import DiTTransformer2DModel, dit_config
from sd_core.catalog import EMBEDDED_TEXT_TO_IMAGE
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

    @property
    def ratio(self) -> float:
        return self.sd_core_s / self.diffusers_s


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
    with torch.device("meta"):
        model = ours_class.from_config(config or dict(reference.config))
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


def unet_pair(unet_config: dict, dtype, latent: int, context_dim: int):
    import diffusers
    reference = diffusers.UNet2DConditionModel.from_config(unet_config).eval().to(device(), dtype)
    ours = twin(UNet2DConditionModel, reference)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, reference.config.in_channels, latent, latent, generator=generator).to(device(), dtype)
    context = torch.randn(2, 77, context_dim, generator=generator).to(device(), dtype)
    added = None
    if reference.config.addition_embed_type == "text_time":
        pooled = reference.config.projection_class_embeddings_input_dim - 6 * reference.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=generator).to(device(), dtype),
                 "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2).to(device(), dtype)}
    t = torch.tensor(500, device=device())
    return (lambda: ours(sample, t, context, added),
            lambda: reference(sample, t, encoder_hidden_states=context, added_cond_kwargs=added))


def vae_pair(vae_config: dict, dtype, latent: int):
    import diffusers
    reference = diffusers.AutoencoderKL.from_config(vae_config).eval().to(device(), dtype)
    ours = twin(AutoencoderKL, reference)
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device(), dtype)
    return lambda: ours.decode(z), lambda: reference.decode(z).sample


def text_pair(text_config: dict, dtype, projected: bool):
    import transformers
    reference_class = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
    reference = reference_class(transformers.CLIPTextConfig(**text_config)).eval().to(device(), dtype)
    ours = twin(CLIPTextModelWithProjection if projected else CLIPTextModel, reference, reference.config.to_dict())
    ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(0)).to(device())
    return lambda: ours(ids, output_hidden_states=True), lambda: reference(ids, output_hidden_states=True)


def dit_pair(dtype, latent: int):
    import diffusers
    reference = diffusers.DiTTransformer2DModel(**dit_config("DiT-XL/2", image_size=latent * 8)).eval().to(device(), dtype)
    ours = twin(DiTTransformer2DModel, reference)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=generator).to(device(), dtype)
    t, y = torch.tensor([500, 500], device=device()), torch.tensor([207, 1000], device=device())
    return lambda: ours(x, t, y), lambda: reference(x, t, y).sample


def embedded_pipeline_pair(steps: int = 20):
    """The shipped text-to-image model end to end: sd_core's text_to_image vs diffusers' pipeline."""
    import diffusers

    from sd_core.loading import load_pipeline
    from sd_core.pipelines import text_to_image
    ours = load_pipeline(EMBEDDED_TEXT_TO_IMAGE, device=device())
    reference = diffusers.StableDiffusionPipeline.from_pretrained(EMBEDDED_TEXT_TO_IMAGE,
                                                                  local_files_only=True).to(device())
    reference.set_progress_bar_config(disable=True)
    prompt = "a small red circle on the left on a gray background"
    return (lambda: text_to_image(ours, prompt, steps=steps, seed=0, guidance_scale=5.0),
            lambda: reference(prompt, num_inference_steps=steps, guidance_scale=5.0,
                              generator=torch.Generator().manual_seed(0)).images)


def run(configs: list[str], dtypes: list[str], repeats: int, latent: int = 32) -> list[Row]:
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for config in configs:
            pairs = {}
            if config == "embedded":
                if dtype_name == "fp32" and EMBEDDED_TEXT_TO_IMAGE.is_dir():
                    pairs["pipeline (20 steps, CFG)"] = embedded_pipeline_pair()
            elif config == "sd15":
                pairs["UNet step (batch 2)"] = unet_pair(presets.UNET_SD15, dtype, latent, 768)
                pairs["text encoder (CLIP-L)"] = text_pair(presets.CLIP_VIT_L, dtype, False)
                pairs[f"VAE decode ({latent * 8}px)"] = vae_pair(presets.VAE_SD, dtype, latent)
            elif config == "sdxl":
                pairs["UNet step (batch 2)"] = unet_pair(presets.UNET_SDXL_BASE, dtype, latent, 2048)
                pairs["text encoder 2 (bigG)"] = text_pair(presets.OPENCLIP_VIT_BIGG, dtype, True)
            elif config == "dit-xl-2":
                pairs["transformer step (batch 2)"] = dit_pair(dtype, latent)
            for what, (ours, theirs) in pairs.items():
                row = measure(config, dtype_name, what, ours, theirs, repeats)
                print(f"{row.config:9} {row.dtype:5} {row.what:28} sd_core {row.sd_core_s:8.3f}s  diffusers "
                      f"{row.diffusers_s:8.3f}s  ratio {row.ratio:5.2f}", flush=True)
                rows.append(row)
            del pairs
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| config | dtype | measurement | sd_core (s) | diffusers (s) | ratio | sd_core peak MB | diffusers peak MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.config} | {r.dtype} | {r.what} | {r.sd_core_s:.3f} | {r.diffusers_s:.3f} | {r.ratio:.2f} | "
              f"{r.sd_core_mb:.0f} | {r.diffusers_mb:.0f} |" for r in rows]
    return "\n".join(lines)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = run(args.configs.split(","), args.dtypes.split(","), args.repeats, args.latent)
    print()
    print(f"device: {device()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows], indent=2))
