"""Rules for serving sd_core to strangers (the Gradio app calls these; nothing here imports gradio).

    cache = LoadingCache(load_source, size=2)         # loads without blocking requests for other models
    LIMITS = WorkLimits.for_device("cpu")             # work per request, and one slot shared by heavy work
    with LIMITS.slot(check_request(LIMITS, "text_to_image", width * height, steps, batch)):
        ...
    image = open_upload(path, max_pixels=LIMITS.max_upload_pixels)
    seed = as_whole_number(seed, "seed", 0, MAX_SEED)

What a request costs and its bound (WorkLimits, check_request) are the work model of sd_core.pipelines.work.
Every refusal is a ValueError whose text a visitor can read: it names the parameter, the bound and what to do.
"""
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from sd_core.pipelines.image_io import MAX_IMAGE_BYTES, open_image
# The settings record's rules, under the names the app's checks use.
from sd_core.pipelines.settings import number_sent as visitor_number  # noqa: F401
from sd_core.pipelines.settings import one_of as as_choice  # noqa: F401
from sd_core.pipelines.settings import real_number as as_number  # noqa: F401
from sd_core.pipelines.settings import shown as _shown
from sd_core.pipelines.settings import whole_number as as_whole_number  # noqa: F401
# The work model (pipelines/work.py), which the command line prices its runs with too.
from sd_core.pipelines.work import MAX_UPLOAD_PIXELS, Busy, WorkLimits, check_request  # noqa: F401

MAX_UPLOAD_BYTES = 20 * 2 ** 20  # launch(max_file_size=...): gradio refuses larger uploads before they are kept


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
