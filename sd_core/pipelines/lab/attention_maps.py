"""Attention maps per prompt word (Tang et al. 2023, "What the DAAM: Interpreting Stable Diffusion Using Cross
Attention"): where in the picture each word was looked at while it was drawn.

For every cross-attention layer of the UNet and every denoising step, the softmax probabilities of the
conditional half of the CFG batch ([uncond, cond]; the whole batch without guidance) are summed over heads,
upsampled (bilinear) from the layer's token grid to the latent grid and summed; a word's map is the sum over
its tokens (a word is split into tokens as the tokenizer splits it, and re-joined), normalised to [0, 1] and
drawn over the picture. The probabilities come from a recorder on the Attention modules (models.layers): the
picture is the one generate() makes without it.

    maps = attention_maps(pipe, GenerationSettings(prompt="a big red circle on the left on a gray background"))
    maps.heat("circle")          # (H, W) latent-grid map in [0, 1]; maps.overlays: one picture per word
"""
import contextlib
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from sd_core.models.layers import Attention
from sd_core.pipelines.generate import generate
from sd_core.pipelines.lab.drawing import heat_overlay
from sd_core.pipelines.settings import GenerationSettings


def prompt_words(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """(word, its token positions in the encoder's context) for each word of `prompt`, as the tokenizer splits
    it: position 0 is the start token, and a word's last token is the one whose symbol ends in </w>."""
    ids = tokenizer.tokenize(prompt)[:tokenizer.model_max_length - 2]
    words, group = [], []
    for position, token_id in enumerate(ids, start=1):
        group.append((position, token_id))
        if tokenizer.id_to_token.get(token_id, "").endswith("</w>") or position == len(ids):
            words.append((tokenizer.decode([t for _, t in group]).strip(), [p for p, _ in group]))
            group = []
    return words


def token_grid(tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer's token grid: the latent grid halved (rounding up, as the UNet's stride-2 convs do)
    until it holds `tokens` tokens."""
    h, w = latent_size
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"A cross-attention layer of {tokens} tokens fits no halving of the latent grid {latent_size}.")
    return h, w


def add_layer(total: torch.Tensor | None, probabilities: torch.Tensor, latent_size: tuple[int, int],
              guided: bool) -> torch.Tensor:
    """total + one layer's probabilities (B, heads, N, M) as (B', M, H, W): the conditional half when guided,
    summed over heads, upsampled to the latent grid."""
    if guided:
        probabilities = probabilities[probabilities.shape[0] // 2:]
    summed = probabilities.float().sum(dim=1)  # (B', N, M)
    h, w = token_grid(summed.shape[1], latent_size)
    grid = summed.transpose(1, 2).reshape(summed.shape[0], summed.shape[2], h, w)
    layer = F.interpolate(grid, size=latent_size, mode="bilinear", align_corners=False)
    return layer if total is None else total + layer


@contextlib.contextmanager
def recording(unet: torch.nn.Module, latent_size: tuple[int, int], guided: bool):
    """While open, every cross-attention layer's probabilities are added to `totals[0]` (B', M, H, W)."""
    totals = [None]
    layers = [module for name, module in unet.named_modules() if name.endswith("attn2") and isinstance(module, Attention)]

    def record(probabilities):
        totals[0] = add_layer(totals[0], probabilities, latent_size, guided)
    for layer in layers:
        layer.recorder = record
    try:
        yield totals
    finally:
        for layer in layers:
            layer.recorder = None


@dataclasses.dataclass
class AttentionMaps:
    image: object  # the picture (PIL), as generate() makes it
    words: list  # [(word, token positions)]
    totals: torch.Tensor  # (M, H, W): every context token's summed attention on the latent grid
    parameters: dict

    def heat(self, word: str) -> np.ndarray:
        """The map of the word's first occurrence in the prompt (see positions_heat)."""
        matches = [positions for text, positions in self.words if text == word]
        if not matches:
            raise ValueError(f"{word!r} is not a word of the prompt; its words are {[text for text, _ in self.words]}.")
        return self.positions_heat(matches[0])

    def positions_heat(self, positions: list[int]) -> np.ndarray:
        """The map of the tokens at `positions` on the latent grid: their sum scaled to [0, 1] from its minimum to
        its maximum (every pixel attends to every word a little: without the minimum's floor the map would show
        that floor)."""
        summed = self.totals[positions].sum(dim=0)
        low = summed.min()
        return ((summed - low) / (summed.max() - low).clamp_min(1e-12)).numpy()

    @property
    def overlays(self) -> list:
        """(picture with the word's map drawn over it, the word) for each word, a repeated word once per place."""
        return [(heat_overlay(self.image, self.positions_heat(positions)), text) for text, positions in self.words]


@torch.no_grad()
def attention_maps(pipe, settings: GenerationSettings, callback=None) -> AttentionMaps:
    """One picture (the first of the settings' batch) and its prompt words' cross-attention maps."""
    if settings.prompt_syntax != "plain" or not isinstance(settings.prompt, str):
        raise ValueError("Attention maps read one plain prompt (prompt syntax 'plain'), whose words are its tokens.")
    settings = settings.replace(images_per_prompt=1)
    factor = pipe.vae_scale_factor
    latent_size = ((settings.height or pipe.default_size) // factor, (settings.width or pipe.default_size) // factor)
    with recording(pipe.unet, latent_size, settings.guidance_scale > 1) as totals:
        result = generate(pipe, settings, callback=callback)
    if totals[0] is None:
        raise ValueError("This UNet has no cross-attention layers to read.")
    tokenizer = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
    return AttentionMaps(result.images[0], prompt_words(tokenizer, settings.prompt), totals[0][0], result.parameters)
