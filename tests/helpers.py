"""Shared test helpers: seeded random weights and the parity measure."""
import math

import numpy as np
import pytest
import torch
from torch import nn


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter seeded, well-scaled random values (norm weights near 1), so parity is not
    tested on the reference's zero-initialised layers. Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| divided by the scale of the reference output (max |b|, at least 1e-12)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def twin(ours_class, reference: nn.Module, config: dict | None = None) -> nn.Module:
    """An sd_core model built from the reference's config, loading its state_dict with strict=True."""
    config = dict(reference.config) if config is None else config
    model = ours_class.from_config(config)
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.eval()


def parameter_shapes(model: nn.Module) -> dict:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def assert_images_match(ours: list, reference: np.ndarray):
    """sd_core's PIL images against a diffusers `output_type="np"` batch, by compare/'s 8-bit rule:
    equal, or at most 1 level off in at most 0.1% of values."""
    from compare.parity import compare_images
    stage = compare_images(np.stack([np.asarray(image) for image in ours]), (reference * 255).round().astype("uint8"))
    assert stage.passed, (stage.max_abs, stage.extra)


def slow_unless(cases: list, quick: list) -> list:
    """Parametrised cases (tuples, or single values), those not in `quick` marked slow: the quick loop
    (`-m "not slow"`) keeps a case of each behaviour, the full suite runs every case under the same ids."""
    return [pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=() if case in quick else pytest.mark.slow)
            for case in cases]
