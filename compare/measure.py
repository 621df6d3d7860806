"""How compare.benchmark measures: a pair of zero-argument calls (sd_core's, diffusers') timed alternately with
their peak memory growth (measure, PeakMemory), the work of a call by torch's flop counter (count_flops), this
machine's matmul peak in a dtype (peak_gflops), the PSNR of one model output against another (tensor_psnr), and the
rows' Markdown table, each row with the load average as its timing began and ended."""
import ctypes
import dataclasses
import math
import os
import threading
import time

import torch
from torch.utils import flop_counter

from sd_core.checkpoints.loading import DTYPES  # noqa: F401  (the benchmark's and self_kinds' dtype names)

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
    peer_psnr: float | None = None  # peer rows: the peer (in the diffusers column) against sd_core's parity path
    vs_default: float | None = None  # fast rows: sd_core fast / diffusers default (the plain row's diffusers time)
    load_start: float = 0.0  # the 1-minute load average as the row's timing began and ended (busy: above the cores)
    load_end: float = 0.0
    sd_core_spread: float = 0.0  # slowest repeat over the fastest, minus 1
    diffusers_spread: float = 0.0
    sd_core_first_s: float = 0.0  # the first call, timed apart (torch.compile's compile time lands here)
    diffusers_first_s: float = 0.0

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
    dtype: torch.dtype | None = None  # what sd_core's side computes in, where not the job's dtype (bf16 fast rows)
    baseline: str | None = None  # the plain row whose diffusers time is "diffusers default" for this row
    peer_psnr: object = None  # peer rows: a function giving the peer's PSNR against sd_core's parity path


def measure(config: str, dtype: str, what: str, ours, theirs, repeats: int) -> Row:
    """The fastest time, the spread (slowest over fastest) and peak memory of two zero-argument callables, alternating
    after one first call each (timed apart: it holds torch.compile's compile time, from inductor's cache when warm).
    The minimum is what the code costs; on a shared machine other work only adds to a time."""
    times, memory, first = {"ours": [], "theirs": []}, {"ours": 0, "theirs": 0}, {}
    load_start = os.getloadavg()[0]
    with torch.no_grad():
        for name, fn in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - start
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
    return Row(config, dtype, what, min(times["ours"]), min(times["theirs"]), memory["ours"] / 2 ** 20,
               memory["theirs"] / 2 ** 20, load_start=load_start, load_end=os.getloadavg()[0],
               sd_core_spread=spread(times["ours"]), diffusers_spread=spread(times["theirs"]),
               sd_core_first_s=first["ours"], diffusers_first_s=first["theirs"])


def spread(times: list[float]) -> float:
    """How much slower the slowest repeat was than the fastest (0.08: 8%)."""
    return max(times) / min(times) - 1


def tensor_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of `a` against `b` over b's range (for model outputs, which have no fixed scale)."""
    a, b = a.float(), b.float()
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(float(b.max() - b.min()) ** 2 / mse)


def table(rows: list[Row]) -> str:
    """The rows as Markdown: fastest times with the spread of the repeats (+8%: the slowest was 8% slower)."""
    lines = [("| config | dtype | measurement | sd_core (s) | diffusers (s) | ratio | fast / diffusers default "
              "| first call (s) sd_core / diffusers | sd_core GFLOP | sd_core % of peak | diffusers GFLOP "
              "| diffusers % of peak | PSNR vs parity (dB) | sd_core peak MB | diffusers peak MB | load avg (start-end) |"),
             "| --- " * 16 + "|"]
    for r in rows:
        psnr = '' if r.psnr is None else f'{r.psnr:.1f}'
        psnr += '' if r.peer_psnr is None else f' (peer {r.peer_psnr:.1f})'
        lines.append(
            f"| {r.config} | {r.dtype} | {r.what} | {r.sd_core_s:.3f} (+{r.sd_core_spread:.0%}) | "
            f"{r.diffusers_s:.3f} (+{r.diffusers_spread:.0%}) | {r.ratio:.2f} | "
            f"{'' if r.vs_default is None else f'{r.vs_default:.2f}'} | "
            f"{r.sd_core_first_s:.2f} / {r.diffusers_first_s:.2f} | "
            f"{r.sd_core_gflop:.1f} | {r.peak_share(r.sd_core_gflop, r.sd_core_s):.1f} | {r.diffusers_gflop:.1f} | "
            f"{r.peak_share(r.diffusers_gflop, r.diffusers_s):.1f} | {psnr} | {r.sd_core_mb:.0f} | "
            f"{r.diffusers_mb:.0f} | {r.load_start:.1f}-{r.load_end:.1f} |")
    return "\n".join(lines)


def load_line(start: tuple, end: tuple) -> str:
    """The load average (1, 5, 15 min) at the start and the end of the run, and whether the machine was busy: with
    more runnable processes than cores the timings (and ratios) carry other work."""
    cores = os.cpu_count() or 1
    busy = max(start[0], end[0]) > cores
    return (f"load average (1/5/15 min) at the start {start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f}, at the end "
            f"{end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}, on {cores} cores"
            + (": the machine was BUSY, so the times and ratios below carry other work" if busy else ": quiet"))
