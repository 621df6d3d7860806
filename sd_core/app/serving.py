"""Rules for serving sd_core to strangers (the Gradio app calls these; nothing here imports gradio).

    cache = LoadingCache(load_source, size=2)         # loads without blocking requests for other models
    LIMITS = WorkLimits.for_device("cpu")             # work per request, and one slot shared by heavy work
    with LIMITS.slot(check_request(LIMITS, "text_to_image", width * height, steps, batch)):
        ...
    image = open_upload(path, max_pixels=LIMITS.max_upload_pixels)
    seed = as_whole_number(seed, "seed", 0, MAX_SEED)

Every refusal is a ValueError whose text a visitor can read: it names the parameter, the bound and what to do.
"""
import math
import os
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from sd_core.pipelines.image_io import MAX_IMAGE_BYTES, describe_size, open_image, side_of
# The settings record's rules, under the names the app's checks use.
from sd_core.pipelines.settings import number_sent as visitor_number  # noqa: F401
from sd_core.pipelines.settings import one_of as as_choice  # noqa: F401
from sd_core.pipelines.settings import real_number as as_number  # noqa: F401
from sd_core.pipelines.settings import shown as _shown
from sd_core.pipelines.settings import whole_number as as_whole_number  # noqa: F401

MAX_UPLOAD_BYTES = 20 * 2 ** 20  # launch(max_file_size=...): gradio refuses larger uploads before they are kept
MAX_UPLOAD_PIXELS = 2048 * 2048  # decoded at most (12 MB of RGB); the work bound below may allow fewer


# ------------------------------------------------------------------------------------------------- inputs


def as_text(value, name: str, max_chars: int = 2000, allow_none: bool = True) -> str:
    """A prompt: a string of at most `max_chars` characters (None -> "" when allowed)."""
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text; got {type(value).__name__} {_shown(value)}.")
    if len(value) > max_chars:
        raise ValueError(f"{name} is {len(value)} characters long; this server takes at most {max_chars} "
                         f"(only the first 77 tokens reach the model anyway).")
    return value


def raw_value(component):
    """A gradio input component (Number, Slider, Dropdown, ...) whose value reaches the handler exactly as the
    visitor sent it, to be checked there with as_whole_number / as_number / as_choice. Gradio's own preprocessing
    rounds a seed of 1.5 to 2 (precision=0) and answers NaN, "ten" or None with "The upstream Gradio app has
    raised an exception" before the handler runs. (An instance attribute, not a subclass: gradio writes a .pyi
    stub beside any module that subclasses a component.)"""
    component.preprocess = lambda payload: payload
    return component


def numbers_choice(dropdown):
    """A Dropdown of numbers whose API schema lists numbers (gradio's own says strings, which it then refuses),
    its value reaching the handler as sent, to be checked there (forms.choice_of takes 2 and "2" alike)."""
    values = [value for _, value in dropdown.choices]
    dropdown.api_info = lambda: {"type": "number", "enum": values}
    return raw_value(dropdown)


# ------------------------------------------------------------------------------------------------ uploads


def open_upload(file_or_pil, max_pixels: int = MAX_UPLOAD_PIXELS, max_bytes: int = MAX_UPLOAD_BYTES,
                name: str | None = None, convert=None):
    """An uploaded image (a path gradio kept, a file object or a PIL image) as 8-bit RGB (or through `convert`, as
    images.open_image takes it), within `max_pixels` and
    `max_bytes`; the header's size is checked before anything is decoded. Messages name the file by its base name
    (never the server's folders). For an upload checked before decoding, give gradio's Image
    `type="filepath", image_mode=None` (with type="pil" gradio decodes the whole file first)."""
    if file_or_pil is None:
        raise ValueError("Upload an image (or pick an example) first.")
    if isinstance(file_or_pil, dict) and "path" in file_or_pil:  # a FileData payload sent to the raw API
        file_or_pil = file_or_pil["path"]
    return open_image(file_or_pil, max_pixels=max_pixels, max_bytes=min(max_bytes, MAX_IMAGE_BYTES), name=name,
                      convert=convert)


# ------------------------------------------------------------------------------------------------ models


class Busy(ValueError):
    """A request refused because the server is busy (not because of what it asked): try again later."""


class LoadingCache:
    """Loaded models by key, at most `size` of them (the least recently used is released when another loads).

    No lock is held while a model loads: requests for an already-loaded model never wait on another model's
    load; concurrent requests for the same model wait for the one load in progress (and share its result or
    its error). A failed load is remembered for `error_ttl_s` seconds (so a failing download is not retried by
    every click), then tried again. At most `max_parallel_loads` loads run at once (each needs the memory of a
    model beside the `size` cached); no request waits for a load (its own or the one before it) longer than
    `wait_s` seconds."""

    def __init__(self, load: Callable, size: int = 2, error_ttl_s: float = 10.0, max_parallel_loads: int = 1,
                 wait_s: float = 900.0, release: Callable | None = None):
        if size < 1:
            raise ValueError(f"A model cache holds at least 1 model; got size={size}.")
        self.load, self.size, self.error_ttl_s, self.wait_s = load, size, error_ttl_s, wait_s
        self.release = release or release_memory
        self._lock = threading.Lock()  # guards the three dicts below; never held during a load
        self._models: OrderedDict = OrderedDict()
        self._loading: dict[Hashable, Future] = {}
        self._errors: dict[Hashable, tuple[float, BaseException]] = {}
        self._loads = threading.BoundedSemaphore(max_parallel_loads)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._models

    def loaded(self) -> list:
        with self._lock:
            return list(self._models)

    def get(self, key: Hashable, *args, **kwargs):
        """The model for `key`, loading it with `load(key, *args, **kwargs)` if needed."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            failed = self._errors.get(key)
            if failed is not None and time.monotonic() - failed[0] < self.error_ttl_s:
                raise failed[1].with_traceback(None)  # (re-raising would lengthen its traceback each time)
            self._errors.pop(key, None)
            future = self._loading.get(key)
            owner = future is None
            if owner:
                future = self._loading[key] = Future()
        if not owner:
            try:
                return future.result(timeout=self.wait_s)
            except FutureTimeout:
                raise ValueError(f"This model is still loading (waited {self.wait_s:.0f} s); try again in a "
                                 f"minute.") from None
        try:
            if not self._loads.acquire(timeout=self.wait_s):
                raise Busy(f"Other models are loading (waited {self.wait_s:.0f} s); try again in a minute.")
            try:
                model = self.load(key, *args, **kwargs)
            finally:
                self._loads.release()
        except BaseException as error:
            with self._lock:
                del self._loading[key]
                if isinstance(error, Exception) and not isinstance(error, Busy):  # the model's own failure
                    now = time.monotonic()  # keys come from visitors: keep only the unexpired errors
                    self._errors = {k: e for k, e in self._errors.items() if now - e[0] < self.error_ttl_s}
                    self._errors[key] = (now, error)
            future.set_exception(error)
            raise
        released = []
        with self._lock:
            del self._loading[key]
            self._models[key] = model
            while len(self._models) > self.size:
                released.append(self._models.popitem(last=False)[1])
        future.set_result(model)
        if released:
            del released[:]  # drop the references here, then let the release hook free the memory
            self.release()
        return model


def release_memory():
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# -------------------------------------------------------------------------------------------------- work

# Seconds per million pixel-steps (pixels x steps x images / 1e6) on the embedded models, measured on one core
# of this project's CI machine (text to image 22, DiT 20, VAE round-trip 25 s per Mpx; compare runs sd_core,
# diffusers and a per-layer check: about 3x text to image). A GPU is taken as 50x faster. A deployment serving
# real checkpoints sets its own rates, and observe() learns them from the requests it runs.
CPU_SECONDS_PER_MPX_STEP = {"text_to_image": 22.0, "dit": 20.0, "vae_roundtrip": 25.0, "compare": 66.0}
MAX_KINDS = 256
# Each 77-token prompt chunk past the first (A1111 syntax: a long prompt, or a BREAK) adds this share of a step's
# work: the UNet's cross-attention reads a context one chunk longer at every step, and the chunk is encoded (SD 1.5
# at 512 px: about 1.5% of a step in FLOPs, plus 5% of one step to encode it; 333 BREAKs ran 2.8x a plain request on
# the embedded model).
CHUNK_SHARE = 0.03
RECENT_RUNS = 5  # a kind's learned speed is the median of its last runs: one outlier never sets it
PRIOR_RUNS = 2  # the table's speed counts as this many runs until real ones replace it
KIND_NAMES = {"text_to_image": "text-to-image", "dit": "DiT", "vae_roundtrip": "VAE round-trip", "compare": "compare"}


@dataclass
class WorkLimits:
    """What one request may cost on this machine, and how many heavy requests run at once across all endpoints.

    `seconds_per_mpx_step[kind]`: this machine's speed for each kind of request; `max_seconds`: the longest a
    request may compute. A request's budget is max_seconds / speed, in megapixel-steps. Requests estimated
    above `light_seconds` share `heavy_slots` slots (one semaphore for every endpoint), so two heavy jobs per
    endpoint can never pile up; light ones never queue behind them."""
    seconds_per_mpx_step: dict[str, float] = field(default_factory=lambda: dict(CPU_SECONDS_PER_MPX_STEP))
    max_seconds: float = 60.0
    light_seconds: float = 10.0
    heavy_slots: int = 1
    slot_wait_s: float = 300.0
    max_upload_pixels: int = MAX_UPLOAD_PIXELS
    _slots: threading.BoundedSemaphore = field(init=False, repr=False)

    def __post_init__(self):
        self._slots = threading.BoundedSemaphore(self.heavy_slots)
        self._observed_lock = threading.Lock()
        self._recent: dict[str, deque] = {}  # kind -> its last RECENT_RUNS speeds, seeded with the prior

    @classmethod
    def for_device(cls, device: str = "cpu", **overrides) -> "WorkLimits":
        speed = 1.0 if str(device).startswith("cpu") else 1 / 50
        rates = {kind: rate * speed for kind, rate in CPU_SECONDS_PER_MPX_STEP.items()}
        return cls(seconds_per_mpx_step=rates, **overrides)

    @classmethod
    def from_environment(cls, device: str = "cpu", environ=os.environ) -> "WorkLimits":
        """The operator's widening: SD_CORE_MAX_SECONDS (per request), SD_CORE_HEAVY_SLOTS, SD_CORE_MAX_UPLOAD_PIXELS."""
        overrides = {}
        for variable, key, kind in (("SD_CORE_MAX_SECONDS", "max_seconds", float),
                                    ("SD_CORE_HEAVY_SLOTS", "heavy_slots", int),
                                    ("SD_CORE_MAX_UPLOAD_PIXELS", "max_upload_pixels", int)):
            if environ.get(variable):
                try:
                    overrides[key] = kind(environ[variable])
                except ValueError:
                    raise ValueError(f"{variable}={environ[variable]!r} is not a {kind.__name__}.") from None
                if not overrides[key] > 0:
                    raise ValueError(f"{variable} must be positive; got {environ[variable]!r}.")
        return cls.for_device(device, **overrides)

    def budget_mpx_steps(self, kind: str) -> float:
        return self.max_seconds / self.rate(kind)

    def rate(self, kind: str) -> float:
        """Seconds per Mpx-step for `kind`: "text_to_image", or "text_to_image:<model>" for one model's own speed
        (learned by observe(); until then the kind's). An unknown kind is priced as the slowest known one."""
        rates = self.seconds_per_mpx_step
        return rates.get(kind) or rates.get(kind.split(":")[0]) or max(rates.values())

    def estimate_seconds(self, kind: str, pixels: int, steps: int = 1, batch: int = 1, chunks: int = 1) -> float:
        return work_mpx_steps(pixels, steps, batch, chunks) * self.rate(kind)

    def observe(self, kind: str, seconds: float, pixels: int, steps: int = 1, batch: int = 1, chunks: int = 1):
        """Learn this machine's speed from a finished request: the median of the kind's last RECENT_RUNS speeds,
        the prior counting as PRIOR_RUNS of them, so one slow or fast outlier (a busy moment, a strange request)
        moves nothing and three consistent runs set it."""
        work = work_mpx_steps(pixels, steps, batch, chunks)
        if work <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return
        with self._observed_lock:
            if kind not in self.seconds_per_mpx_step and len(self.seconds_per_mpx_step) >= MAX_KINDS:
                return  # model names come from visitors (hub ids): the table stays bounded
            recent = self._recent.setdefault(kind, deque([self.rate(kind)] * PRIOR_RUNS, maxlen=RECENT_RUNS))
            recent.append(seconds / work)
            self.seconds_per_mpx_step[kind] = statistics.median(recent)

    def slot(self, estimate_s: float) -> "Slot":
        """A context manager: heavy work (estimate above light_seconds) takes one of the shared slots, waiting at
        most slot_wait_s; light work passes at once."""
        return Slot(self, estimate_s > self.light_seconds)


class Slot:
    def __init__(self, limits: WorkLimits, heavy: bool):
        self.limits, self.heavy = limits, heavy

    def __enter__(self):
        if self.heavy and not self.limits._slots.acquire(timeout=self.limits.slot_wait_s):
            raise Busy(f"The server is busy with other large requests (waited {self.limits.slot_wait_s:.0f} s). "
                             f"Try again later, or ask for fewer pixels, steps or images.")
        return self

    def __exit__(self, *_):
        if self.heavy:
            self.limits._slots.release()


def work_mpx_steps(pixels: int, steps: int = 1, batch: int = 1, chunks: int = 1) -> float:
    """A request's work in megapixel-steps, each prompt chunk past the first adding CHUNK_SHARE."""
    return pixels * steps * batch / 1e6 * (1 + CHUNK_SHARE * (max(chunks, 1) - 1))


def check_request(limits: WorkLimits, kind: str, pixels: int, steps: int = 1, batch: int = 1,
                  label: str | None = None, chunks: int = 1) -> float:
    """Refuse a request whose work (pixels x steps x images, and the prompt's 77-token `chunks`) exceeds this
    server's budget for `kind`; returns its estimated seconds (for limits.slot()). `label` names the size in the
    message (default: a square side)."""
    work = work_mpx_steps(pixels, steps, batch, chunks)
    budget = limits.budget_mpx_steps(kind)
    if work > budget:
        side = side_of(pixels)
        size = label or (f"{side}x{side}" if side * side == pixels else describe_size(pixels, "px"))
        parts = [size] + ([f"{steps} steps"] if steps != 1 else []) + ([f"{batch} images"] if batch != 1 else []) + (
            [f"a prompt of {chunks} chunks"] if chunks > 1 else [])
        unit = "Mpx-steps" if steps != 1 or kind not in ("vae_roundtrip",) else "Mpx"
        fewer = [word for word, present in (("size", True), ("steps", steps != 1), ("number of images", batch != 1),
                                            ("prompt (its BREAKs and length)", chunks > 1)) if present]
        fewer = fewer[0] if len(fewer) == 1 else ", ".join(fewer[:-1]) + " or " + fewer[-1]
        raise ValueError(f"{' x '.join(parts)} is {work:.3g} {unit}; this server allows {budget:.3g} {unit} per "
                         f"{KIND_NAMES.get(kind.split(':')[0], kind)} request (about {limits.max_seconds:.0f} s "
                         f"here). "
                         f"Reduce the {fewer}.")
    return work * limits.rate(kind)
