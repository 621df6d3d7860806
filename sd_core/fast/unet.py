"""FastUNet: a shared UNet run with the fast options: channels_last inputs, torch.compile, ToMe (sd_core.fast.tome),
guidance truncation (sd_core.fast.guidance), T-GATE (sd_core.fast.tgate) and DeepCache.

DeepCache (Ma et al. 2023): every `deepcache` steps the full UNet runs and the input of its last up block (the deep
features) is kept; the steps between run only conv_in, the first down block (without its downsampler) and the last
up block, on the cached deep features. A wrapper over the UNet's own submodules: unet.py's forward is unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn

from sd_core.fast.guidance import GuidanceTruncation
from sd_core.fast.options import FastOptions, compiled
from sd_core.fast.tgate import gate_cutoff, with_tgate
from sd_core.fast.tome import with_tome
from sd_core.models.unet import UNet2DConditionModel


class FastUNet(nn.Module):
    """Runs a shared `UNet2DConditionModel` with the fast options; `.config` and parameters are the UNet's.

    With deepcache N > 1 it is stateful: call `reset()` before a new trajectory (FastPipeline does), and a
    change of batch shape or a timestep above the previous one also starts a full step. With guidance truncation
    (`guidance`, started per request by FastPipeline) a step past the cut runs the conditional half of the batch
    and returns it as both halves."""

    def __init__(self, unet: UNet2DConditionModel, options: FastOptions):
        super().__init__()
        self.gate, self.cutoff = {"gated": False, "guided": False, "layers": []}, None
        until = options.guidance_until
        if options.tgate is not None:  # past the gate both halves are equal: guidance stops there too
            self.cutoff = gate_cutoff(options.tgate)
            until = options.tgate if until is None else min(until, options.tgate)
            unet = with_tgate(unet, self.gate)
        self.guidance = GuidanceTruncation(until, options.guidance_similarity, cond_half=1)
        self.tome = {"size": (0, 0), "generator": torch.Generator()}
        if options.tome is not None:
            if not 0 <= options.tome < 1:
                raise ValueError(f"tome is the fraction of tokens merged, from 0 to below 1; got {options.tome}.")
            unet = with_tome(unet, options.tome, self.tome)
        self.unet, self.options = unet, options
        self.full = unet.blocks
        self.shallow = self._shallow
        if options.compile:
            self.full, self.shallow = compiled(unet.blocks, options), compiled(self._shallow, options)
        self.reset()

    @property
    def config(self):
        return self.unet.config

    def reset(self):
        self.calls, self.deep, self.last_timestep = 0, None, None
        self.tome["generator"].manual_seed(0)  # ToMe's random partition: the same for the same request
        for layer in self.gate["layers"]:
            layer.cache = None

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
        guidance, t = self.guidance, float(torch.as_tensor(timestep).flatten()[0])
        skipping = guidance.skips(t)
        self.gate["gated"] = self.cutoff is not None and t < self.cutoff
        self.gate["guided"] = guidance.guided and not skipping
        if not skipping:
            out = self.predict(sample, timestep, encoder_hidden_states, added_cond_kwargs)
            guidance.observe(out)
            return out
        added = added_cond_kwargs and {name: guidance.halve(value) for name, value in added_cond_kwargs.items()}
        if self.deep is not None and self.deep.shape[0] == sample.shape[0]:
            self.deep = guidance.halve(self.deep)  # DeepCache goes on with the conditional rows' deep features
        return guidance.widen(self.predict(guidance.halve(sample), guidance.halve(timestep),
                                           guidance.halve(encoder_hidden_states), added))

    def predict(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
        unet = self.unet
        unet.check_inputs(sample, encoder_hidden_states, added_cond_kwargs)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_conditioning(timestep, sample.shape[0], sample.dtype, sample.device, added_cond_kwargs)
        if self.options.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        self.tome["size"] = tuple(sample.shape[-2:])
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
