"""T-GATE (Zhang et al. 2024, "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion Models"):
cross-attention matters while the image's layout is planned and converges after a few steps, so after the gate step
every cross-attention layer's output is frozen to the one of the last step before it, averaged over the guided
batch's unconditional and conditional halves. Past the gate the two halves see the same cross-attention, so their
predictions are equal and guidance adds nothing: the step runs one half (FastUNet does it through guidance
truncation at the same point of the schedule).

A view of the UNet whose transformer blocks' cross-attentions are wrapped (`GatedCrossAttention`), sharing every
parameter, like ToMe's: layers.py and the parity forward are unchanged.
"""
import copy

import torch
from torch import nn

from sd_core.fast.module_views import view_with
from sd_core.models.layers import BasicTransformerBlock
from sd_core.models.unet import UNet2DConditionModel


def gate_cutoff(gate: float, num_train_timesteps: int = 1000) -> int:
    """The first timestep past the gate: steps at t < cutoff reuse the cached cross-attention. `gate` is the share of
    the noise schedule run in full, counted as guidance truncation counts its `until`."""
    if not (isinstance(gate, float) and 0 < gate < 1):
        raise ValueError(f"tgate is the share of the noise schedule before the gate, strictly between 0 and 1 "
                         f"(e.g. 0.4); got {gate!r}.")
    return round(num_train_timesteps * (1 - gate))


def halves_mean(out: torch.Tensor) -> torch.Tensor:
    """T-GATE's cached value from a guided batch [uncond, cond]: the mean of the halves, (B, N, C) -> (B/2, N, C)."""
    uncond, cond = out.chunk(2)
    return (uncond + cond) / 2


class GatedCrossAttention(nn.Module):
    """One cross-attention layer with T-GATE's cache. FastUNet sets `state["gated"]` per step; before the gate each
    call refreshes the cache with its output, averaged over the halves when `state["guided"]`."""

    def __init__(self, attention: nn.Module, state: dict):
        super().__init__()
        self.attention, self.state = attention, state
        state["layers"].append(self)
        self.cache = None

    def forward(self, x, context):
        if self.state["gated"] and self.cache is not None and self.cache.shape == x.shape:
            return self.cache
        out = self.attention(x, context)
        self.cache = halves_mean(out) if self.state["guided"] else out
        return out


def with_tgate(unet: UNet2DConditionModel, state: dict) -> UNet2DConditionModel:
    """A view of `unet` (every parameter shared) whose transformer blocks' attn2 are GatedCrossAttention; `state`
    ({"gated", "guided", "layers"}) is shared with FastUNet. The original module tree is unchanged."""

    def gated_block(module):
        if not isinstance(module, BasicTransformerBlock):
            return None
        clone = copy.copy(module)
        clone._modules = {**module._modules, "attn2": GatedCrossAttention(module.attn2, state)}
        return clone
    return view_with(unet, gated_block)
