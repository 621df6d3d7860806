"""FastDiT: a shared DiT transformer run with the fast options: FORA feature caching and guidance truncation.

FORA (Selvaraju et al. 2024, "Fast-Forward Caching in Diffusion Transformer Acceleration"): every `dit_cache` steps
each block computes its attention and MLP outputs and keeps them; the steps between reuse them, recomputing only
the block's adaLN modulation for the current timestep (shift, scale, gate: a small MLP on the conditioning), so a
reused step costs the embeddings and the output layer, not the attention or the MLPs. Chosen over DeepCache's idea
adapted to DiT (first and last block fresh, the middle blocks' residual reused) and over reusing the whole stack's
residual by measurement on the embedded DiT (see tests/test_fast.py): at the same share of work skipped, FORA's
current-step gates keep the image closest to the parity path.

The blocks are views (shallow copies sharing every parameter, whose forward is FORA's); dit.py and the parity forward
are unchanged.
"""
import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from sd_core.fast.guidance import GuidanceTruncation
from sd_core.fast.options import FastOptions, compiled
from sd_core.models.dit import DiTBlock, DiTTransformer2DModel, modulate


def fora_block_forward(block: DiTBlock, index: int, cache: dict, x, timestep, class_labels):
    """DiTBlock.forward with its attention and MLP outputs taken from `cache` unless the cache says refresh."""
    conditioning = block.norm1.emb(timestep, class_labels, x.dtype)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
        block.norm1.linear(F.silu(conditioning))[:, None].chunk(6, dim=-1)
    features = cache["features"]
    if cache["refresh"]:
        features[index, "attn"] = block.attn1(modulate(block.norm1.norm(x), shift_msa, scale_msa))
    x = x + gate_msa * features[index, "attn"]
    if cache["refresh"]:
        features[index, "mlp"] = block.ff(modulate(block.norm3(x), shift_mlp, scale_mlp))
    return x + gate_mlp * features[index, "mlp"]


def with_fora(transformer: DiTTransformer2DModel, cache: dict) -> DiTTransformer2DModel:
    """A view of `transformer` whose blocks run FORA's forward on `cache`; every parameter shared."""
    blocks = []
    for index, block in enumerate(transformer.transformer_blocks):
        view = copy.copy(block)
        view.forward = functools.partial(fora_block_forward, block, index, cache)
        blocks.append(view)
    clone = copy.copy(transformer)
    clone._modules = {**transformer._modules, "transformer_blocks": nn.ModuleList(blocks)}
    return clone


class FastDiT(nn.Module):
    """Runs a shared DiT transformer with the fast options; `.config` and parameters are the transformer's.
    Stateful with FORA: call `reset()` before a new trajectory (FastPipeline does); a batch that differs from the
    cached features' or a timestep above the previous one also starts with a full step."""

    def __init__(self, transformer: DiTTransformer2DModel, options: FastOptions):
        super().__init__()
        if not isinstance(options.dit_cache, int) or options.dit_cache < 0:
            raise ValueError(f"dit_cache is a whole number of steps >= 0 (0 or 1: off); got {options.dit_cache!r}.")
        self.guidance = GuidanceTruncation(options.guidance_until, options.guidance_similarity, cond_half=0)
        self.cache = {"refresh": True, "features": {}}
        self.interval, self.options = options.dit_cache, options
        self.transformer = with_fora(transformer, self.cache) if self.interval > 1 else transformer
        self.run = self.transformer
        if options.compile:
            self.run = compiled(self.transformer, options)
        self.reset()

    @property
    def config(self):
        return self.transformer.config

    def reset(self):
        self.calls, self.last_timestep = 0, None
        self.cache["features"].clear()

    def forward(self, hidden_states, timestep, class_labels) -> torch.Tensor:
        guidance = self.guidance
        if not guidance.skips(float(torch.as_tensor(timestep).flatten()[0])):
            out = self.step(hidden_states, timestep, class_labels)
            guidance.observe(out[:, :self.config.in_channels])
            return out
        features = self.cache["features"]
        for key, value in features.items():
            if value.shape[0] == hidden_states.shape[0]:  # FORA goes on with the conditional rows' features
                features[key] = guidance.halve(value)
        return guidance.widen(self.step(guidance.halve(hidden_states), guidance.halve(timestep),
                                        guidance.halve(torch.as_tensor(class_labels))))

    def step(self, hidden_states, timestep, class_labels) -> torch.Tensor:
        t = float(torch.as_tensor(timestep).flatten()[0])
        cached = next(iter(self.cache["features"].values()), None)
        if (cached is None or cached.shape[0] != hidden_states.shape[0]
                or (self.last_timestep is not None and t > self.last_timestep)):
            self.calls = 0  # a new trajectory (or batch): start with a full step
        self.last_timestep = t
        self.cache["refresh"] = self.interval <= 1 or self.calls % self.interval == 0
        self.calls += 1
        return self.run(hidden_states, timestep, class_labels)
