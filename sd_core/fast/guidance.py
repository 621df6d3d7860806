"""Guidance truncation (Castillo et al. 2023, "Adaptive Guidance"): late in sampling the conditional and the
unconditional predictions agree, so classifier-free guidance changes little while it doubles the batch. Once
guidance stops, a step runs the conditional half of the batch only.

Two rules, either or both:
- until: guidance runs for the first `until` fraction of the noise schedule, the fraction diffusers' denoising_end
  counts (guided while t >= round(T (1 - until))); on a schedule spaced evenly in t, the share of the steps.
- similarity: guidance stops after the first step at which every image's conditional and unconditional predictions
  have a cosine similarity of at least this (the paper's adaptive rule); it never restarts within a trajectory.

The model wrappers (FastUNet, FastDiT) apply it: they run the conditional half and return it twice, so the
pipeline's own guide(uncond, cond) computes cond + scale * 0 = cond exactly and the sampling loop is unchanged.
"""
import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class GuidanceTruncation:
    until: float | None  # fraction of the noise schedule that is guided; None: no cut by schedule
    similarity: float | None  # cosine similarity of cond and uncond at which guidance stops; None: not adaptive
    cond_half: int  # where the conditional rows are in a guided batch: 1 for sd_core's [uncond, cond], 0 for DiT
    num_train_timesteps: int = 1000
    guided: bool = False  # whether the current request's batch is [uncond, cond] halves (FastPipeline says)
    stopped: bool = False
    stopped_at: float | None = None  # the timestep of the first conditional-only step, for tests and reports

    def __post_init__(self):
        if self.until is not None and not (isinstance(self.until, float) and 0 < self.until <= 1):
            raise ValueError(f"guidance_until is the guided fraction of the noise schedule, above 0 and at most 1; "
                             f"got {self.until!r}.")
        if self.similarity is not None and not (isinstance(self.similarity, float) and -1 < self.similarity < 1):
            raise ValueError(f"guidance_similarity is a cosine similarity between -1 and 1 (e.g. 0.99); "
                             f"got {self.similarity!r}.")

    @property
    def active(self) -> bool:
        return self.until is not None or self.similarity is not None

    def start(self, guided: bool):
        """A new request: `guided` when its model batch is [uncond, cond] halves (guidance_scale > 1)."""
        self.guided, self.stopped, self.stopped_at = guided and self.active, False, None

    def skips(self, timestep: float) -> bool:
        """Whether the step at `timestep` runs the conditional half only."""
        if self.guided and not self.stopped and self.until is not None:
            cutoff = round(self.num_train_timesteps * (1 - self.until))
            self.stopped = timestep < cutoff
        if self.stopped and self.stopped_at is None:
            self.stopped_at = timestep
        return self.stopped

    def observe(self, prediction: torch.Tensor):
        """After a guided step: stop guidance once cond and uncond agree in every image (the adaptive rule)."""
        if self.guided and self.similarity is not None and not self.stopped:
            first, second = prediction.float().flatten(1).chunk(2)
            self.stopped = bool(F.cosine_similarity(first, second, dim=1).min() >= self.similarity)

    def halve(self, tensor):
        """The conditional rows of a guided batch; a tensor of one value for every row (a timestep) or None passes
        unchanged."""
        if isinstance(tensor, torch.Tensor) and tensor.ndim and tensor.shape[0] > 1:
            return tensor.chunk(2)[self.cond_half]
        return tensor

    @staticmethod
    def widen(prediction: torch.Tensor) -> torch.Tensor:
        """The conditional prediction as both halves of a guided batch."""
        return torch.cat([prediction, prediction])
