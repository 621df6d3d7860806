"""The fast path's options (one frozen record, `FastOptions`), torch.compile as they ask for it, and inductor's on-disk
cache."""
import dataclasses
import os
from pathlib import Path

import torch

from sd_core.pipelines.settings import FAST_FIELDS

COMPILE_CACHE = Path(os.environ.get("SD_CORE_CACHE", Path.home() / ".cache" / "sd_core")) / "inductor"


@dataclasses.dataclass(frozen=True)
class FastOptions:
    channels_last: bool = True
    compile: bool = False
    compile_mode: str | None = None  # None: torch.compile's default mode
    compile_backend: str = "inductor"  # "eager": dynamo's tracing and guards only (tests)
    freeze: bool = False  # with compile: inductor's weight freezing (weights folded in as constants, prepacked for
    # oneDNN on the CPU); the weights must not change afterwards (a LoRA merged later is not seen: make a new fast path)
    bf16: str | bool = "auto"  # "auto": the hardware's rule (sd_core.fast.precision); True: bf16; False: the model's
    deepcache: int = 0  # UNet: 0/1 off; N: the full UNet every N steps, the shallow pass between
    tome: float | None = None  # UNet: None off; r in [0, 1): the fraction of top-resolution tokens merged
    guidance_until: float | None = None  # the guided fraction of the noise schedule; after it, cond only
    guidance_similarity: float | None = None  # stop guidance once cos(cond, uncond) reaches this in every image
    tgate: float | None = None  # UNet: T-GATE, the share of the schedule after which cross-attention is frozen
    dit_cache: int = 0  # DiT: 0/1 off; N: FORA, every block's attention and MLP outputs recomputed every N steps
    text_cache: int = 8  # prompts whose encodings are kept per text encoder (exact: the same tensors); 0: off


def options_asked(options: FastOptions, record_class) -> dict:
    """The inverse of asked_by: the options of `options` that a record of `record_class` can hold and that are
    on, as that record's fields hold them."""
    fields = {field.name for field in dataclasses.fields(record_class)}
    return {name: getattr(options, name) for name in FAST_FIELDS
            if name in fields and getattr(options, name) not in (None, 0)}


def asked_by(settings) -> dict:
    """The options a settings record (GenerationSettings or DiTSettings) asks for, as make_fast() takes them: only
    those it turns on (the record's "off" is 0 or 1.0 where FastOptions' is 0 or None)."""
    return settings.replace(fast=True).fast_options()


def use_compile_cache():
    """Point inductor's on-disk cache at sd_core's (unless the user chose one), so a second process reuses the
    compiled kernels. Importing some libraries fills in torch's default (/tmp/torchinductor_$USER) early."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(COMPILE_CACHE)


def compiled(fn, options: FastOptions):
    """torch.compile of a module or function as the options say: the mode, the backend, and inductor's freezing."""
    use_compile_cache()
    if not options.freeze:
        return torch.compile(fn, mode=options.compile_mode, backend=options.compile_backend)
    if options.compile_backend != "inductor" or options.compile_mode is not None:
        raise ValueError("freeze is inductor's weight freezing: use it with compile_backend='inductor' and no "
                         "compile_mode (torch.compile takes a mode or inductor options, not both).")
    return torch.compile(fn, backend="inductor", options={"freezing": True})
