"""The opt-in fast path: the same loaded models, run faster, with the distance from the parity path shown.

    fast = make_fast(pipe, deepcache=3)              # nothing in `pipe` changes; its parity path stays exact
    result = fast.text_to_image("a big red circle on the left on a gray background", steps=20, seed=7)

What it can do, each a named option (`FastOptions`), each measured by `python -m compare benchmark`:
- channels_last: the UNet's and VAE decoder's activations in NHWC (oneDNN's native conv layout). The shared
  fp32 weights are untouched (only the inputs are converted); a bf16 copy has its conv weights in NHWC too, so
  oneDNN reorders no weights per call (the bf16 SD1.5 UNet step at 256 px: 0.72 -> 0.65 s, as diffusers').
- compile: `torch.compile` of the UNet forward (and of DeepCache's shallow pass). Compiled graphs are reused
  across requests of the same shape (no recompiles; tested with dynamo's counters); inductor's cache lives
  in `~/.cache/sd_core/inductor` (TORCHINDUCTOR_CACHE_DIR) so a second process compiles from cache.
- bf16: "auto" runs the UNet and the VAE's decode in bfloat16 only where a measured bf16 matmul/conv beats fp32
  on this machine (`bf16_speedup()`); bf16 copies are made then (once per model, shared by every fast pipeline
  over it), never a cast of the shared ones. The SD1.5 VAE decode at 256 px: 2.55 s fp32 -> 0.50 s (57 dB).
- deepcache (Ma et al. 2023, DeepCache): every `deepcache` steps the full UNet runs and the input of its last
  up block (the deep features) is kept; the steps between run only conv_in, the first down block (without
  its downsampler) and the last up block, on the cached deep features. A wrapper over the UNet's own
  submodules: unet.py's forward is unchanged.
- tome (Bolya & Hoffman 2023, Token Merging for Stable Diffusion): before self-attention in the transformer blocks at
  the UNet's highest resolution, merge the `tome` fraction of tokens into their most similar neighbours (bipartite
  soft matching: one random destination per 2x2 cell, cosine similarity of the block's input tokens, the top-r
  sources averaged into their best destination), attend over the fewer tokens, and unmerge by copying each
  destination's output back to the sources merged into it. A view of the UNet whose top-resolution blocks are
  wrapped (`ToMeBlock`), sharing every parameter: layers.py and the parity forward are unchanged.
  Measured (CPU, 2 threads, one batch-2 step): an SD1.5-size bf16 UNet at 512 px (64x64 latents, 4096 tokens)
  runs 1.14x faster at tome=0.5 and 1.21x at 0.75; at 256 px and below nothing is gained (1.00x at 32x32, 0.95x
  for the embedded model at 16x16: attention over <= 1024 tokens is a small share of the step). Image PSNR against
  parity: 34.4 dB (embedded, 0.5).
- SDPA attention: sd_core's attention layers default to SDPA; the fast path leaves the backend as it is (the
  parity tests switch to `math` explicitly).
"""
import copy
import dataclasses
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sd_core.pipelines import generate as pipelines
from sd_core.pipelines.metadata import tag
from sd_core.pipelines.sampling import converted_copy
from sd_core.models.unet import UNet2DConditionModel

COMPILE_CACHE = Path(os.environ.get("SD_CORE_CACHE", Path.home() / ".cache" / "sd_core")) / "inductor"


@dataclasses.dataclass(frozen=True)
class FastOptions:
    channels_last: bool = True
    compile: bool = False
    compile_mode: str | None = None  # None: torch.compile's default mode
    compile_backend: str = "inductor"  # "eager": dynamo's tracing and guards only (tests)
    bf16: str | bool = "auto"  # "auto": only where this machine's bf16 kernels are measured faster than fp32
    deepcache: int = 0  # 0/1: off; N: the full UNet every N steps, the shallow pass between
    tome: float | None = None  # None: off; r in [0, 1): the fraction of top-resolution tokens merged (0: wrapped, none merged)


@functools.cache
def bf16_speedup() -> float:
    """fp32 time / bf16 time of one SD-width ResNet block + transformer block (320 channels, 16x16, 77 text
    tokens) on this machine: above 1, bf16 is faster. Measured once per process, medians of 3.

    A bare matmul misleads: on this AMX CPU a 512 matmul measured 66x faster in bf16, while the README's earlier
    whole-UNet run measured bf16 slower; this block probe (6.1x) matched the whole SD1.5 UNet (3.7x, 1 thread)."""
    from sd_core.models.layers import ResnetBlock2D, Transformer2DModel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        resnet = ResnetBlock2D(320, 320, 1280, 32, 1e-5).eval()
        transformer = Transformer2DModel(8, 40, 320, 1, 768, 32, False, False).eval()
    x, emb, context = (torch.randn(*shape, generator=generator) for shape in ((1, 320, 16, 16), (1, 1280), (1, 77, 768)))
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        r, t = resnet.to(device, dtype), transformer.to(device, dtype)
        inputs = [tensor.to(device, dtype) for tensor in (x, emb, context)]
        with torch.no_grad():
            t(r(inputs[0], inputs[1]), inputs[2])
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                t(r(inputs[0], inputs[1]), inputs[2])
                if device == "cuda":
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - start)
        times[dtype] = statistics.median(samples)
    return times[torch.float32] / times[torch.bfloat16]


def uses_bf16(setting: str | bool, dtype: torch.dtype) -> bool:
    """Whether the fast path runs a model of `dtype` in bf16: when asked (True), or "auto" on fp32 weights where
    bf16 measured faster here (above 1.1x)."""
    return setting is True or (setting == "auto" and dtype == torch.float32 and bf16_speedup() > 1.1)


def use_compile_cache():
    """Point inductor's on-disk cache at sd_core's (unless the user chose one), so a second process reuses the
    compiled kernels. Importing some libraries fills in torch's default (/tmp/torchinductor_$USER) early."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(COMPILE_CACHE)


def bipartite_soft_matching(metric: torch.Tensor, height: int, width: int, r: int, generator: torch.Generator):
    """ToMe for SD's matching on (B, N = height * width, C) tokens: returns (merge, unmerge).

    Destinations: one token per 2x2 cell, picked at random; sources: the rest. Each source's best destination by
    cosine similarity of `metric`; the r sources with the highest similarity are averaged into their destination
    (merge: N -> N - r tokens), the others kept. unmerge copies each destination's output back to its sources."""
    batch, n, _ = metric.shape
    if r <= 0:
        return (lambda x: x), (lambda x: x)
    cells_h, cells_w = height // 2, width // 2
    choice = torch.randint(4, (cells_h, cells_w, 1), generator=generator).to(metric.device)
    is_dst = torch.zeros(cells_h, cells_w, 4, dtype=torch.int64, device=metric.device).scatter_(2, choice, -1)
    is_dst = is_dst.view(cells_h, cells_w, 2, 2).transpose(1, 2).reshape(cells_h * 2, cells_w * 2)
    full = torch.zeros(height, width, dtype=torch.int64, device=metric.device)  # odd sizes: the last row/column are sources
    full[:cells_h * 2, :cells_w * 2] = is_dst
    order = full.reshape(1, n, 1).argsort(dim=1)  # destinations (-1) first
    num_dst = cells_h * cells_w
    dst_idx, src_idx = order[:, :num_dst], order[:, num_dst:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    src = metric.gather(1, src_idx.expand(batch, -1, metric.shape[-1]))
    dst = metric.gather(1, dst_idx.expand(batch, -1, metric.shape[-1]))
    best, best_dst = (src @ dst.transpose(-1, -2)).max(dim=-1)  # (B, sources)
    ranked = best.argsort(dim=-1, descending=True)[..., None]
    r = min(r, src.shape[1])
    kept, merged = ranked[:, r:], ranked[:, :r]  # positions among the sources
    into = best_dst[..., None].gather(1, merged)  # positions among the destinations

    def merge(x):
        c = x.shape[-1]
        x_src = x.gather(1, src_idx.expand(batch, -1, c))
        x_dst = x.gather(1, dst_idx.expand(batch, -1, c))
        unmerged = x_src.gather(1, kept.expand(-1, -1, c))
        x_dst = x_dst.scatter_reduce(1, into.expand(-1, -1, c), x_src.gather(1, merged.expand(-1, -1, c)), "mean")
        return torch.cat([unmerged, x_dst], dim=1)

    def unmerge(x):
        c, num_kept = x.shape[-1], kept.shape[1]
        unmerged, x_dst = x[:, :num_kept], x[:, num_kept:]
        out = x.new_zeros(batch, n, c)
        out.scatter_(1, dst_idx.expand(batch, -1, c), x_dst)
        out.scatter_(1, src_idx.expand(batch, -1, 1).gather(1, kept).expand(-1, -1, c), unmerged)
        out.scatter_(1, src_idx.expand(batch, -1, 1).gather(1, merged).expand(-1, -1, c),
                     x_dst.gather(1, into.expand(-1, -1, c)))
        return out
    return merge, unmerge


class ToMeBlock(nn.Module):
    """A BasicTransformerBlock whose self-attention runs on merged tokens (ToMe for SD), sharing its parameters.
    `state` (shared with FastUNet) holds the current latent size and the partition's generator."""

    def __init__(self, block, ratio: float, state: dict):
        super().__init__()
        self.block, self.ratio, self.state = block, ratio, state

    def forward(self, x, context):
        block, (height, width) = self.block, self.state["size"]
        r = int(x.shape[1] * self.ratio) if x.shape[1] == height * width else 0  # the highest resolution only
        merge, unmerge = bipartite_soft_matching(x, height, width, r, self.state["generator"])
        x = x + unmerge(block.attn1(merge(block.norm1(x))))
        x = x + block.attn2(block.norm2(x), context)
        return x + block.ff(block.norm3(x))


def with_tome(unet: UNet2DConditionModel, ratio: float, state: dict) -> UNet2DConditionModel:
    """A view of `unet` (shallow copies along the way, every parameter shared) whose transformer blocks are ToMeBlocks;
    each merges only when it sees the highest resolution's tokens. The original module tree is unchanged."""
    from sd_core.models.layers import BasicTransformerBlock

    def view(module):
        if isinstance(module, BasicTransformerBlock):
            return ToMeBlock(module, ratio, state)
        children = {name: view(child) for name, child in module.named_children()}
        if all(children[name] is child for name, child in module.named_children()):
            return module
        clone = copy.copy(module)
        clone._modules = {**module._modules, **children}  # copy.copy shared the dict; the original keeps its own
        return clone
    return view(unet)


class FastUNet(nn.Module):
    """Runs a shared `UNet2DConditionModel` with the fast options; `.config` and parameters are the UNet's.

    With deepcache N > 1 it is stateful: call `reset()` before a new trajectory (FastPipeline does), and a
    change of batch shape or a timestep above the previous one also starts a full step."""

    def __init__(self, unet: UNet2DConditionModel, options: FastOptions):
        super().__init__()
        self.tome = {"size": (0, 0), "generator": torch.Generator()}
        if options.tome is not None:
            if not 0 <= options.tome < 1:
                raise ValueError(f"tome is the fraction of tokens merged, from 0 to below 1; got {options.tome}.")
            unet = with_tome(unet, options.tome, self.tome)
        self.unet, self.options = unet, options
        self.full = unet.blocks
        self.shallow = self._shallow
        if options.compile:
            use_compile_cache()
            self.full = torch.compile(unet.blocks, mode=options.compile_mode, backend=options.compile_backend)
            self.shallow = torch.compile(self._shallow, mode=options.compile_mode,
                                         backend=options.compile_backend)
        self.reset()

    @property
    def config(self):
        return self.unet.config

    def reset(self):
        self.calls, self.deep, self.last_timestep = 0, None, None
        self.tome["generator"].manual_seed(0)  # ToMe's random partition: the same for the same request

    def _shallow(self, sample, emb, context, deep):
        """conv_in, the first down block's ResNets/transformers (no downsampler), the last up block on `deep`."""
        unet = self.unet
        x = unet.conv_in(sample)
        skips = [x]
        first = unet.down_blocks[0]
        for i, resnet in enumerate(first.resnets):
            x = resnet(x, emb)
            if first.attentions:
                x = first.attentions[i](x, context)
            skips.append(x)
        x = unet.up_blocks[-1](deep, skips, emb, context)
        return unet.conv_out(F.silu(unet.conv_norm_out(x)))

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
        unet = self.unet
        unet.check_inputs(sample, encoder_hidden_states, added_cond_kwargs)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_conditioning(timestep, sample.shape[0], sample.dtype, sample.device, added_cond_kwargs)
        if self.options.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        self.tome["size"] = tuple(sample.shape[-2:])
        t = float(torch.as_tensor(timestep).flatten()[0])
        if (self.deep is None or self.deep.shape[0] != sample.shape[0]
                or (self.last_timestep is not None and t > self.last_timestep)):
            self.calls = 0  # a new trajectory (or batch): start with a full step
        self.last_timestep = t
        interval = self.options.deepcache
        if interval > 1 and self.calls % interval:
            out = self.shallow(sample, emb, encoder_hidden_states, self.deep)
        else:
            out, deep = self.full(sample, emb, encoder_hidden_states)
            self.deep = deep if interval > 1 else deep[:0]  # without DeepCache only the batch size is kept
        self.calls += 1
        return out.contiguous()


class FastDecoder(nn.Module):
    """The shared VAE, decoding with channels_last latents, on its bf16 copy `decoding` where one is given;
    encoding (image to image) stays the VAE's own."""

    def __init__(self, vae, options: FastOptions, decoding=None):
        super().__init__()
        self.vae, self.options, self.decoding = vae, options, decoding or vae

    @property
    def config(self):
        return self.vae.config

    @property
    def downscale_factor(self):
        return self.vae.downscale_factor

    def encode(self, x):
        return self.vae.encode(x)

    def decode(self, z):
        dtype = next(self.vae.parameters()).dtype
        z = z.to(next(self.decoding.parameters()).dtype)
        if self.options.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.decoding.decode(z).contiguous().to(dtype)  # the image in the VAE's own dtype


@dataclasses.dataclass
class FastPipeline:
    """A loaded pipeline run through the fast path. `pipe` is the pipeline the generate functions see (the
    original's components, with the UNet and VAE wrapped); `original` is untouched."""
    original: object
    pipe: object
    options: FastOptions
    dtype: torch.dtype

    def reset(self):
        self.pipe.unet.reset()

    def generate(self, settings: pipelines.GenerationSettings, **inputs) -> pipelines.GenerationResult:
        """pipelines.generate() through the fast path; the images' metadata says "fast" and how."""
        self.reset()
        result = pipelines.generate(self.pipe, settings, **inputs)
        result.parameters["fast"] = describe(self.options, self.dtype)
        for image in result.images:  # each image's metadata says it came from the fast path, not the parity one
            own = {**json.loads(image.info["sd_core"]), "fast": result.parameters["fast"]}
            tag([image], own)
        return result

    def text_to_image(self, prompt, negative_prompt=None, **options) -> pipelines.GenerationResult:
        if "image" in options:
            raise TypeError("text_to_image takes no image; use image_to_image.")
        settings, inputs = pipelines.settings_and_inputs(prompt, negative_prompt, options)
        return self.generate(settings, **inputs)

    def image_to_image(self, image, prompt, negative_prompt=None, strength: float = 0.8, **options):
        settings, inputs = pipelines.settings_and_inputs(prompt, negative_prompt, dict(options, strength=strength))
        return self.generate(settings, image=image, **inputs)


def describe(options: FastOptions, dtype: torch.dtype) -> str:
    parts = [name for name in ("channels_last", "compile") if getattr(options, name)]
    if options.deepcache > 1:
        parts.append(f"deepcache={options.deepcache}")
    if options.tome is not None:
        parts.append(f"tome={options.tome:g}")
    parts.append(str(dtype).removeprefix("torch."))
    return ",".join(parts)


def make_fast(pipe, options: FastOptions | None = None, **overrides) -> FastPipeline:
    """The fast path over a loaded StableDiffusionPipeline, sharing its models (bf16 copies of the UNet and the VAE
    only when bf16 is chosen). `make_fast(pipe, deepcache=3, compile=True)`; see FastOptions."""
    options = dataclasses.replace(options or FastOptions(), **overrides)
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise TypeError(f"make_fast takes a loaded Stable Diffusion pipeline (with a UNet); got {type(pipe).__name__}.")
    unet = pipe.unet
    dtype = next(unet.parameters()).dtype
    decoding = None
    if uses_bf16(options.bf16, dtype) and dtype != torch.bfloat16:
        unet, dtype = converted_copy(unet, torch.bfloat16, options.channels_last), torch.bfloat16
        if next(pipe.vae.parameters()).dtype == torch.float32:  # a float16 VAE keeps decode's fp32 upcast rule
            decoding = converted_copy(pipe.vae, torch.bfloat16, options.channels_last)
    fast = dataclasses.replace(pipe, unet=FastUNet(unet, options), vae=FastDecoder(pipe.vae, options, decoding))
    return FastPipeline(pipe, fast, options, dtype)
