"""Token Merging for Stable Diffusion (Bolya & Hoffman 2023): before self-attention in the transformer blocks at the
UNet's highest resolution, merge a fraction of the tokens into their most similar neighbours (bipartite soft
matching: one random destination per 2x2 cell, cosine similarity of the block's input tokens, the top-r sources
averaged into their best destination), attend over the fewer tokens, and unmerge by copying each destination's
output back to the sources merged into it. A view of the UNet whose top-resolution blocks are wrapped (`ToMeBlock`),
sharing every parameter: layers.py and the parity forward are unchanged."""
import torch
from torch import nn

from sd_core.fast.module_views import view_with
from sd_core.models.unet import UNet2DConditionModel


def bipartite_soft_matching(metric: torch.Tensor, height: int, width: int, r: int, generator: torch.Generator):
    """ToMe for SD's matching on (B, N = height * width, C) tokens: returns (merge, unmerge).

    Destinations: one token per 2x2 cell, picked at random; sources: the rest. Each source's best destination by
    cosine similarity of `metric`; the r sources with the highest similarity are averaged into their destination
    (merge: N -> N - r tokens), the others kept. unmerge copies each destination's output back to its sources."""
    batch, n, _ = metric.shape
    if r <= 0:
        return (lambda x: x), (lambda x: x)
    cells_h, cells_w = height // 2, width // 2
    choice = torch.randint(4, (cells_h, cells_w, 1), generator=generator).to(metric.device)
    is_dst = torch.zeros(cells_h, cells_w, 4, dtype=torch.int64, device=metric.device).scatter_(2, choice, -1)
    is_dst = is_dst.view(cells_h, cells_w, 2, 2).transpose(1, 2).reshape(cells_h * 2, cells_w * 2)
    full = torch.zeros(height, width, dtype=torch.int64, device=metric.device)  # odd sizes: the last row/column are sources
    full[:cells_h * 2, :cells_w * 2] = is_dst
    order = full.reshape(1, n, 1).argsort(dim=1)  # destinations (-1) first
    num_dst = cells_h * cells_w
    dst_idx, src_idx = order[:, :num_dst], order[:, num_dst:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    src = metric.gather(1, src_idx.expand(batch, -1, metric.shape[-1]))
    dst = metric.gather(1, dst_idx.expand(batch, -1, metric.shape[-1]))
    best, best_dst = (src @ dst.transpose(-1, -2)).max(dim=-1)  # (B, sources)
    ranked = best.argsort(dim=-1, descending=True)[..., None]
    r = min(r, src.shape[1])
    kept, merged = ranked[:, r:], ranked[:, :r]  # positions among the sources
    into = best_dst[..., None].gather(1, merged)  # positions among the destinations

    def merge(x):
        c = x.shape[-1]
        x_src = x.gather(1, src_idx.expand(batch, -1, c))
        x_dst = x.gather(1, dst_idx.expand(batch, -1, c))
        unmerged = x_src.gather(1, kept.expand(-1, -1, c))
        x_dst = x_dst.scatter_reduce(1, into.expand(-1, -1, c), x_src.gather(1, merged.expand(-1, -1, c)), "mean")
        return torch.cat([unmerged, x_dst], dim=1)

    def unmerge(x):
        c, num_kept = x.shape[-1], kept.shape[1]
        unmerged, x_dst = x[:, :num_kept], x[:, num_kept:]
        out = x.new_zeros(batch, n, c)
        out.scatter_(1, dst_idx.expand(batch, -1, c), x_dst)
        out.scatter_(1, src_idx.expand(batch, -1, 1).gather(1, kept).expand(-1, -1, c), unmerged)
        out.scatter_(1, src_idx.expand(batch, -1, 1).gather(1, merged).expand(-1, -1, c),
                     x_dst.gather(1, into.expand(-1, -1, c)))
        return out
    return merge, unmerge


class ToMeBlock(nn.Module):
    """A BasicTransformerBlock whose self-attention runs on merged tokens (ToMe for SD), sharing its parameters.
    `state` (shared with FastUNet) holds the current latent size and the partition's generator."""

    def __init__(self, block, ratio: float, state: dict):
        super().__init__()
        self.block, self.ratio, self.state = block, ratio, state

    def forward(self, x, context):
        block, (height, width) = self.block, self.state["size"]
        r = int(x.shape[1] * self.ratio) if x.shape[1] == height * width else 0  # the highest resolution only
        merge, unmerge = bipartite_soft_matching(x, height, width, r, self.state["generator"])
        x = x + unmerge(block.attn1(merge(block.norm1(x))))
        x = x + block.attn2(block.norm2(x), context)
        return x + block.ff(block.norm3(x))


def with_tome(unet: UNet2DConditionModel, ratio: float, state: dict) -> UNet2DConditionModel:
    """A view of `unet` (every parameter shared) whose transformer blocks are ToMeBlocks; each merges only when it
    sees the highest resolution's tokens. The original module tree is unchanged."""
    from sd_core.models.layers import BasicTransformerBlock
    return view_with(unet, lambda module: ToMeBlock(module, ratio, state)
                     if isinstance(module, BasicTransformerBlock) else None)
