"""The opt-in fast path: the same loaded models, run faster, with the distance from the parity path shown.

    fast = make_fast(pipe, deepcache=3)              # nothing in `pipe` changes; its parity path stays exact
    result = fast.text_to_image("a big red circle on the left on a gray background", steps=20, seed=7)

What it can do, each a named option (`FastOptions`), each measured by `python -m compare benchmark`:
- channels_last: the UNet's and VAE decoder's activations in NHWC (oneDNN's native conv layout). Only the
  input tensors are converted, so the shared weights are untouched.
- compile: `torch.compile` of the UNet forward (and of DeepCache's shallow pass). Compiled graphs are reused
  across requests of the same shape (no recompiles; tested with dynamo's counters); inductor's cache lives
  in `~/.cache/sd_core/inductor` (TORCHINDUCTOR_CACHE_DIR) so a second process compiles from cache.
- bf16: "auto" runs the UNet in bfloat16 only where a measured bf16 matmul/conv beats fp32 on this machine
  (`bf16_speedup()`); a bf16 copy of the UNet is made then, never a cast of the shared one.
- deepcache (Ma et al. 2023, DeepCache): every `deepcache` steps the full UNet runs and the input of its last
  up block (the deep features) is kept; the steps between run only conv_in, the first down block (without
  its downsampler) and the last up block, on the cached deep features. A wrapper over the UNet's own
  submodules: unet.py's forward is unchanged.
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

from . import pipelines
from .images import tag
from .unet import UNet2DConditionModel

COMPILE_CACHE = Path(os.environ.get("SD_CORE_CACHE", Path.home() / ".cache" / "sd_core")) / "inductor"


@dataclasses.dataclass(frozen=True)
class FastOptions:
    channels_last: bool = True
    compile: bool = False
    compile_mode: str | None = None  # None: torch.compile's default mode
    compile_backend: str = "inductor"  # "eager": dynamo's tracing and guards only (tests)
    bf16: str | bool = "auto"  # "auto": only where this machine's bf16 kernels are measured faster than fp32
    deepcache: int = 0  # 0/1: off; N: the full UNet every N steps, the shallow pass between


@functools.cache
def bf16_speedup() -> float:
    """fp32 time / bf16 time of one SD-width ResNet block + transformer block (320 channels, 16x16, 77 text
    tokens) on this machine: above 1, bf16 is faster. Measured once per process, medians of 3.

    A bare matmul misleads: on this AMX CPU a 512 matmul measured 66x faster in bf16, while the README's earlier
    whole-UNet run measured bf16 slower; this block probe (6.1x) matched the whole SD1.5 UNet (3.7x, 1 thread)."""
    from .layers import ResnetBlock2D, Transformer2DModel
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


def use_compile_cache():
    """Point inductor's on-disk cache at sd_core's (unless the user chose one), so a second process reuses the
    compiled kernels. Importing some libraries fills in torch's default (/tmp/torchinductor_$USER) early."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(COMPILE_CACHE)


class FastUNet(nn.Module):
    """Runs a shared `UNet2DConditionModel` with the fast options; `.config` and parameters are the UNet's.

    With deepcache N > 1 it is stateful: call `reset()` before a new trajectory (FastPipeline does), and a
    change of batch shape or a timestep above the previous one also starts a full step."""

    def __init__(self, unet: UNet2DConditionModel, options: FastOptions):
        super().__init__()
        self.unet, self.options = unet, options
        self.full = self._full
        self.shallow = self._shallow
        if options.compile:
            use_compile_cache()
            self.full = torch.compile(self._full, mode=options.compile_mode, backend=options.compile_backend)
            self.shallow = torch.compile(self._shallow, mode=options.compile_mode,
                                         backend=options.compile_backend)
        self.reset()

    @property
    def config(self):
        return self.unet.config

    def reset(self):
        self.calls, self.deep, self.last_timestep = 0, None, None

    def _full(self, sample, emb, context):
        """The UNet's forward after the time embedding; also returns the last up block's input."""
        unet = self.unet
        x = unet.conv_in(sample)
        skips = [x]
        for block in unet.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        if unet.config.mid_block_type is not None:
            x = unet.mid_block(x, emb, context)
        for block in unet.up_blocks[:-1]:
            x = block(x, skips, emb, context)
        deep = x
        x = unet.up_blocks[-1](x, skips, emb, context)
        return unet.conv_out(F.silu(unet.conv_norm_out(x))), deep

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
    """The shared VAE with channels_last latents on decode; everything else is the VAE's own."""

    def __init__(self, vae, options: FastOptions):
        super().__init__()
        self.vae, self.options = vae, options

    @property
    def config(self):
        return self.vae.config

    @property
    def downscale_factor(self):
        return self.vae.downscale_factor

    def encode(self, x):
        return self.vae.encode(x)

    def decode(self, z):
        z = z.to(next(self.vae.parameters()).dtype)  # a bf16 UNet's latents, decoded by the VAE in its dtype
        if self.options.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(z).contiguous()


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

    def generate(self, prompt, negative_prompt=None, **kwargs) -> pipelines.GenerationResult:
        self.reset()
        result = pipelines.generate(self.pipe, prompt, negative_prompt, **kwargs)
        result.parameters["fast"] = describe(self.options, self.dtype)
        for image in result.images:  # each image's metadata says it came from the fast path, not the parity one
            own = {**json.loads(image.info["sd_core"]), "fast": result.parameters["fast"]}
            tag([image], own)
        return result

    def text_to_image(self, prompt, negative_prompt=None, **kwargs) -> pipelines.GenerationResult:
        if "image" in kwargs:
            raise TypeError("text_to_image takes no image; use image_to_image.")
        return self.generate(prompt, negative_prompt, **kwargs)

    def image_to_image(self, image, prompt, negative_prompt=None, strength: float = 0.8, **kwargs):
        return self.generate(prompt, negative_prompt, image=image, strength=strength, **kwargs)


def describe(options: FastOptions, dtype: torch.dtype) -> str:
    parts = [name for name in ("channels_last", "compile") if getattr(options, name)]
    if options.deepcache > 1:
        parts.append(f"deepcache={options.deepcache}")
    parts.append(str(dtype).removeprefix("torch."))
    return ",".join(parts)


def make_fast(pipe, options: FastOptions | None = None, **overrides) -> FastPipeline:
    """The fast path over a loaded StableDiffusionPipeline, sharing its models (a bf16 copy of the UNet only when
    bf16 is chosen). `make_fast(pipe, deepcache=3, compile=True)`; see FastOptions."""
    options = dataclasses.replace(options or FastOptions(), **overrides)
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise TypeError(f"make_fast takes a loaded Stable Diffusion pipeline (with a UNet); got {type(pipe).__name__}.")
    unet = pipe.unet
    dtype = next(unet.parameters()).dtype
    use_bf16 = options.bf16 is True or (options.bf16 == "auto" and dtype == torch.float32 and bf16_speedup() > 1.1)
    if use_bf16 and dtype != torch.bfloat16:
        unet, dtype = copy.deepcopy(unet).to(torch.bfloat16), torch.bfloat16
    fast = dataclasses.replace(pipe, unet=FastUNet(unet, options), vae=FastDecoder(pipe.vae, options))
    return FastPipeline(pipe, fast, options, dtype)
