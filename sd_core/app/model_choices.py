"""The models the app offers and keeps loaded: the embedded and curated hub models, what lies under the
operator's model roots (and the LoRAs and embeddings beside them), memory checks, and the loaded-model cache.

Where the extras live, under each model root (--models-dir / SD_CORE_MODELS_DIR):
    <root>/loras/*.safetensors          LoRAs (any file there)
    <root>/*.safetensors                a LoRA too when its keys say so (kohya `lora_unet_`/`lora_te*_`, diffusers
                                        `.lora_A.`/`.lora.down.`/...: read from the header, no tensor loaded);
                                        any other single file is offered as a model
    <root>/embeddings/*.safetensors     textual-inversion embeddings (pickled .pt/.bin files are never loaded)
"""
import functools
import os
import threading
from pathlib import Path

import gradio as gr
import torch

from sd_core.app import serving
from sd_core.checkpoints import catalog
from sd_core.checkpoints.catalog import CatalogModel
from sd_core.checkpoints.convert import CheckpointError
from sd_core.checkpoints.loading import HUB_ID, inside, load_from_hub, load_pipeline
from sd_core.checkpoints.weights_files import read_safetensors_header
from sd_core.pipelines.lora import is_lora

EMBEDDED = {name: Path(model.source) for name, model in catalog.EMBEDDED.items()}
HUB_BY_SOURCE = {model.source: model for model in catalog.HUB.values()}


class Settings:
    """What the server operator chose (command line / environment), not what a visitor sends."""
    model_roots: list[Path] = [Path(p).resolve() for p in os.environ.get("SD_CORE_MODELS_DIR", "").split(os.pathsep) if p]
    allow_hub: bool = os.environ.get("SD_CORE_ALLOW_HUB") == "1"  # any owner/name a visitor types
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: torch.dtype = torch.float16 if torch.cuda.is_available() else torch.float32


def hub_offered() -> bool:
    """The curated hub models are offered where the hub is reachable: on a Space, or when the operator allows it."""
    return Settings.allow_hub or bool(os.environ.get("SPACE_ID"))


@functools.lru_cache(maxsize=1024)
def is_lora_file(path: Path, modified: float) -> bool:
    """A .safetensors file is a LoRA when its tensor names say so (read from the header; `modified` keys the cache)."""
    try:
        return is_lora(read_safetensors_header(path)[0])
    except CheckpointError:  # an unreadable file is offered as a model; loading it says what is wrong
        return False


def root_files(what: str) -> list[tuple[str, Path]]:
    """(label, path) of the LoRAs ("loras") or embeddings ("embeddings") under the model roots: regular files only,
    each resolved inside its root (a link out of the root, a FIFO or a device is never listed, so never opened)."""
    found = []
    for root in Settings.model_roots:
        if not root.is_dir():
            continue
        paths = offered_files(root, sorted((root / what).glob("*.safetensors")))
        if what == "loras":
            paths += [(p, real) for p, real in offered_files(root, sorted(root.glob("*.safetensors")))
                      if is_lora_file(real, real.stat().st_mtime)]
        found += [(f"{what}: {p.relative_to(root)}", real) for p, real in paths]
    return found


def offered_files(root: Path, paths) -> list[tuple[Path, Path]]:
    """(path, its resolved path) of those `paths` that are regular files inside `root` once links are resolved
    (as checkpoints.loading.inside checks a model folder's files)."""
    offered = []
    for path in paths:
        try:
            real = inside(root.resolve(), path).resolve(strict=True)
        except (CheckpointError, OSError, RuntimeError):  # RuntimeError: a link loop
            continue
        if real.is_file():
            offered.append((path, real))
    return offered


def extra_path(what: str, choice: str) -> Path:
    for label, path in root_files(what):
        if label == choice:
            return path
    raise gr.Error(f"{choice!r} is not one of the offered {what}. Pick one from the list (files in a model root's "
                   f"{what}/ folder).")


def model_choices(kind: str) -> list[tuple[str, str]]:
    """(label, value) pairs a visitor may pick: embedded models, what lies under the model roots, curated hub models.
    kind: "text_to_image", "dit", "sdxl_refiner" or "any"."""
    names = [(name, name) for name, model in catalog.EMBEDDED.items()
             if Path(model.source).is_dir() and kind in ("any", model.kind)]
    for root in Settings.model_roots:
        if root.is_dir():
            files = [p for p, real in offered_files(root, root.glob("*.safetensors"))
                     if not is_lora_file(real, real.stat().st_mtime)]
            folders = [p.parent for p, _ in offered_files(root, root.glob("*/model_index.json"))]
            found = sorted(folders + files)
            names += [(f"models: {p.relative_to(root)}",) * 2 for p in found]
    if hub_offered():
        names += [(f"{model.name} (hub, {weights_gb(model):.1f} GB in {DTYPE_NAMES[Settings.dtype]})", model.name)
                  for model in catalog.HUB.values() if kind in ("any", model.kind)]
    return names


def resolve_source(choice: str) -> Path | str:
    """A visitor's model choice -> a local Path (embedded or under a model root) or a hub repo id (a str).
    A hub-shaped string is never looked up on the local disk."""
    choice = (choice or "").strip()
    if choice in EMBEDDED:
        return EMBEDDED[choice]
    relative = choice.removeprefix("models: ")
    for root in Settings.model_roots:
        candidate = (root / relative).resolve()
        offered = candidate.is_dir() or candidate.is_file()  # never a FIFO or device
        if candidate.is_relative_to(root) and offered and choice.startswith("models: "):
            return candidate
    if hub_offered() and (choice in catalog.HUB or choice in HUB_BY_SOURCE):
        return catalog.HUB[choice].source if choice in catalog.HUB else choice
    if Settings.allow_hub and HUB_ID.match(choice):
        return choice
    raise gr.Error(f"{choice!r} is not one of the offered models. Pick one from the list"
                   + (" or give a hub id like owner/model." if Settings.allow_hub else "."))


def catalog_entry(choice: str) -> CatalogModel | None:
    """The catalog's record for a visitor's choice (a name or a hub id; never resolved on the disk)."""
    if not isinstance(choice, str):
        raise gr.Error(f"model must be the name of an offered model (text); got {type(choice).__name__} "
                       f"{str(choice)[:40]}.")
    return catalog.EMBEDDED.get(choice) or catalog.HUB.get(choice) or HUB_BY_SOURCE.get(choice)


def available_memory_gb() -> float:
    """Free memory where the weights will live: the GPU's, else the machine's RAM."""
    if Settings.device == "cuda":
        try:
            return torch.cuda.mem_get_info()[0] / 1e9
        except RuntimeError:  # ZeroGPU: no GPU attached outside a spaces.GPU call; it lends a whole one
            return float("inf")
    try:
        import psutil
        return psutil.virtual_memory().available / 1e9
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def weights_gb(model: CatalogModel) -> float:
    """What this machine downloads and holds for a hub model: its weights at the app's precision (fp32 files on a
    CPU, the fp16 variant on a GPU)."""
    return model.memory_needed_gb(torch.finfo(Settings.dtype).bits // 8)


def check_fits(model: CatalogModel):
    needed, free = weights_gb(model), available_memory_gb()
    if needed > free:
        where = "GPU memory" if Settings.device == "cuda" else "RAM"
        raise gr.Error(f"{model.name} needs about {needed:.1f} GB of {where} for its weights ({Settings.dtype}); this "
                       f"machine has {free:.1f} GB free. Pick a smaller model, or run the app on a larger machine.")


def load_source(source: Path | str, progress=None):
    """Load a resolved source (a local Path inside the offered models, or a hub repo id); no lock is held."""
    if isinstance(source, Path):
        return load_pipeline(source, dtype=Settings.dtype, device=Settings.device)
    if source in HUB_BY_SOURCE:
        check_fits(HUB_BY_SOURCE[source])

    def on_file(name, index, total, size):
        if progress is not None:
            progress((index - 1, total), desc=f"downloading {source}: {name} ({size / 1e9:.2f} GB)")
    variant = "fp16" if Settings.dtype == torch.float16 else None
    return load_from_hub(source, dtype=Settings.dtype, device=Settings.device, variant=variant, on_file=on_file)


class ModelCache:
    """A visitor's model choice -> resolve_source -> serving.LoadingCache: the last few pipelines, each loaded without
    blocking requests for the others (no lock is held while a model loads).
    `using(pipe)` is the lock a request holds while it runs a pipeline whose weights a LoRA may change."""

    def __init__(self, size: int = 2):
        self.cache = serving.LoadingCache(lambda source, progress=None: load_source(source, progress), size=size)
        self.lock = threading.Lock()

    def get(self, choice: str, progress=None):
        source = resolve_source(choice)
        try:
            return self.cache.get(source, progress)
        except (CheckpointError, OSError, ValueError) as error:  # OSError: missing files, no network
            raise gr.Error(str(error)) from None

    def __contains__(self, choice: str) -> bool:
        """Loaded already (a hub model is never downloaded just to ask)."""
        try:
            return resolve_source(choice) in self.cache
        except gr.Error:
            return False

    def using(self, pipe) -> threading.Lock:
        with self.lock:  # kept on the pipeline: it goes when the cache releases the model
            return pipe.__dict__.setdefault("app_lock", threading.Lock())


MODELS = ModelCache()
