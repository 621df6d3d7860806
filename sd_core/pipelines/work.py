"""The work model: what a request costs (megapixel-steps, each model's learned speed), the bound a request may not
pass, and one slot that heavy work shares. The app's serving rules and the command line both price work with it.

    limits = WorkLimits.for_device("cpu")
    with limits.slot(check_request(limits, "text_to_image", width * height, steps, batch)):
        ...
"""
import math
import os
import statistics
import threading
from collections import deque
from dataclasses import dataclass, field

from sd_core.pipelines.image_io import describe_size, side_of

MAX_UPLOAD_PIXELS = 2048 * 2048  # an upload decoded at most (12 MB of RGB); the work bound may allow fewer


class Busy(ValueError):
    """A request refused because the server is busy (not because of what it asked): try again later."""


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
                  label: str | None = None, chunks: int = 1, host: str = "this server", otherwise: str = "") -> float:
    """Refuse a request whose work (pixels x steps x images, and the prompt's 77-token `chunks`) exceeds this
    server's budget for `kind`; returns its estimated seconds (for limits.slot()). `label` names the size in the
    message (default: a square side); `host` names who sets the bound and `otherwise` ends the advice (the command
    line: "this machine", ", or pass --force")."""
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
        raise ValueError(f"{' x '.join(parts)} is {work:.3g} {unit}; {host} allows {budget:.3g} {unit} per "
                         f"{KIND_NAMES.get(kind.split(':')[0], kind)} request (about {limits.max_seconds:.0f} s "
                         f"here). Reduce the {fewer}{otherwise}.")
    return work * limits.rate(kind)
