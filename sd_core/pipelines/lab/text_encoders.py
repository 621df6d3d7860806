"""Text encoders seen through a function, so an experiment changes what generate() gets from them without a copy
of generate(): the X/Y/Z plot answers a repeated prompt from a cache, a prompt walk blends two prompts' states.

    cached = with_encoders(pipe, caching({}))       # a shallow copy of pipe; the models themselves are shared
    generate(cached, settings)                      # each distinct (encoder, token ids, options) encoded once
"""
import dataclasses
from typing import Callable

import torch

# answer(encoder, input_ids, options) -> what encoder(input_ids, **options) returns
Answer = Callable[[torch.nn.Module, torch.Tensor, dict], object]
ENCODER_SLOTS = ("text_encoder", "text_encoder_2")


class EncoderView:
    """A text encoder whose calls go to `answer`; every attribute (text_model, parameters, config) is the
    encoder's own, so the pipelines' encoding code (clip_skip reads the layers) cannot tell the difference. (The
    model is kept as `wrapped`: a CLIP text model has an `encoder` of its own, which clip_skip reads.)"""

    def __init__(self, encoder: torch.nn.Module, answer: Answer):
        self.wrapped, self.answer = encoder, answer

    def __call__(self, input_ids: torch.Tensor, **options):
        return self.answer(self.wrapped, input_ids, options)

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)


def with_encoders(pipe, answer: Answer):
    """A shallow copy of a Stable Diffusion pipeline whose text encoders answer through `answer`."""
    views = {slot: EncoderView(getattr(pipe, slot), answer) for slot in ENCODER_SLOTS
             if getattr(pipe, slot, None) is not None}
    return dataclasses.replace(pipe, **views)


def encoder_of(encoder):
    """The model behind an encoder or a view of it."""
    return encoder.wrapped if isinstance(encoder, EncoderView) else encoder


def caching(cache: dict, weights_key: Callable[[], object] = lambda: None) -> Answer:
    """An answer that encodes each distinct (encoder, token ids, options, weights_key()) once and returns the same
    output after: the encoder is deterministic, so a cached answer is the one a fresh call would give, bit for bit.
    `weights_key` names the encoder's current weights (the LoRAs merged into it), which change its answers."""
    def answer(encoder, input_ids, options):
        key = (id(encoder), tuple(input_ids.shape), input_ids.cpu().numpy().tobytes(),
               tuple(sorted(options.items())), weights_key())
        if key not in cache:
            cache[key] = encoder(input_ids, **options)
        return cache[key]
    return answer
