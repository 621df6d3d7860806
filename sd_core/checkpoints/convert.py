"""Original single-file checkpoints (CompVis/Stability LDM, OpenCLIP, facebookresearch DiT) <-> diffusers keys.

Every rule is written once, in the diffusers -> original direction: `original_key(diffusers_key)` says
which original tensor (or which chunk of a fused one, transposed or not) holds that parameter.
Converting a file walks the diffusers model's keys and fetches their sources; exporting walks the
same rules backwards. Original keys that no rule uses are reported, unless a drop rule names them
with its reason.
"""
import dataclasses
import re

import torch

from sd_core.config import per_block


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the offending keys and what to do."""


@dataclasses.dataclass(frozen=True)
class Source:
    keys: tuple  # candidate original keys, first found wins (old and new spellings)
    chunk: tuple | None = None  # (index, count): a slice along dim 0 of a fused tensor (q/k/v)
    transpose: bool = False  # OpenCLIP stores the text projection as x @ W, not W x
    conv1x1: bool = False  # stored as a 1x1 conv, used as a linear (the LDM VAE attention)

    def fetch(self, tensors: dict, shape: tuple) -> torch.Tensor | None:
        key = next((k for k in self.keys if k in tensors), None)
        if key is None:
            return None
        t = tensors[key]
        if self.chunk:
            t = t.chunk(self.chunk[1], dim=0)[self.chunk[0]]
        if self.transpose:
            t = t.T
        if tuple(t.shape) != tuple(shape) and t.numel() == torch.Size(shape).numel():
            t = t.reshape(shape)  # 1x1 conv <-> linear
        return t.contiguous()


class Rules:
    """Maps diffusers keys to `Source`s: literal module-prefix renames, then regex renames on the rest."""

    def __init__(self, prefixes: dict, renames: list, prefix: str = "", alternative_prefixes: tuple = ()):
        self.prefixes = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))  # longest match first
        self.renames = [(re.compile(pattern), target, options) for pattern, target, options in renames]
        self.prefix, self.alternative_prefixes = prefix, alternative_prefixes

    def source(self, key: str) -> Source:
        for ours, theirs in self.prefixes:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        options = {}
        for pattern, target, rule_options in self.renames:
            key, count = pattern.subn(target, key)
            if count:
                options.update(rule_options)
        keys = (self.prefix + key, *(alternative + key for alternative in self.alternative_prefixes))
        return Source(keys, **options)


def _ldm_resnet(prefix_map: dict, ours: str, theirs: str):
    for a, b in [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
                 ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]:
        prefix_map[f"{ours}{a}"] = f"{theirs}{b}"


def _ldm_encoder(prefix_map: dict, config):
    """The LDM encoder half a UNet and a ControlNet share: time (and SDXL's label) embedding, conv_in, the
    input_blocks numbered across levels (resnet .0, transformer .1, downsampler .0.op), the middle_block."""
    n = len(config.block_out_channels)
    layers = per_block(config.layers_per_block, n, "layers_per_block")
    prefix_map.update({
        "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.", "mid_block.attentions.0.": "middle_block.1."})
    _ldm_resnet(prefix_map, "mid_block.resnets.0.", "middle_block.0.")
    _ldm_resnet(prefix_map, "mid_block.resnets.1.", "middle_block.2.")
    i = 1
    for b in range(n):
        for layer in range(layers[b]):
            _ldm_resnet(prefix_map, f"down_blocks.{b}.resnets.{layer}.", f"input_blocks.{i}.0.")
            prefix_map[f"down_blocks.{b}.attentions.{layer}."] = f"input_blocks.{i}.1."
            i += 1
        if b < n - 1:
            prefix_map[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{i}.0.op."
            i += 1


def unet_rules(config) -> Rules:
    """LDM `model.diffusion_model.*`: input_blocks / middle_block / output_blocks, indexed across levels."""
    n = len(config.block_out_channels)
    layers = per_block(config.layers_per_block, n, "layers_per_block")
    m = {"conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    _ldm_encoder(m, config)
    j = 0
    for b in range(n):
        has_attention = config.up_block_types[b] == "CrossAttnUpBlock2D"
        up_layers = layers[n - 1 - b] + 1
        for layer in range(up_layers):
            _ldm_resnet(m, f"up_blocks.{b}.resnets.{layer}.", f"output_blocks.{j}.0.")
            m[f"up_blocks.{b}.attentions.{layer}."] = f"output_blocks.{j}.1."
            if layer == up_layers - 1 and b < n - 1:
                m[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{j}.{2 if has_attention else 1}.conv."
            j += 1
    return Rules(m, [], prefix="model.diffusion_model.")


CONTROLNET_PREFIX = "control_model."


def controlnet_rules(config) -> Rules:
    """lllyasviel's ControlNet (cldm.py) `control_model.*`: the UNet's encoder numbering, the hint encoder
    `input_hint_block` (a Sequential whose odd entries are SiLUs: convs at 0, 2, 4, ...), one zero conv per skip
    `zero_convs.{i}.0` and `middle_block_out.0`. Files saved without the `control_model.` level are read too."""
    m = {"controlnet_cond_embedding.conv_in.": "input_hint_block.0.", "controlnet_mid_block.": "middle_block_out.0."}
    hint_convs = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    for k in range(hint_convs):
        m[f"controlnet_cond_embedding.blocks.{k}."] = f"input_hint_block.{2 * k + 2}."
    m["controlnet_cond_embedding.conv_out."] = f"input_hint_block.{2 * hint_convs + 2}."
    _ldm_encoder(m, config)
    renames = [(r"^controlnet_down_blocks\.(\d+)\.", r"zero_convs.\1.0.", {})]
    return Rules(m, renames, prefix=CONTROLNET_PREFIX, alternative_prefixes=("",))


def vae_rules(config, prefix: str = "first_stage_model.") -> Rules:
    """LDM `first_stage_model.*`: encoder.down.{b} / decoder.up.{n-1-b} (reversed), mid.block_1/attn_1/block_2."""
    n = len(config.block_out_channels)
    m = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        m[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        m[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for b in range(n):
        m[f"encoder.down_blocks.{b}.resnets."] = f"encoder.down.{b}.block."
        m[f"encoder.down_blocks.{b}.downsamplers.0.conv."] = f"encoder.down.{b}.downsample.conv."
        m[f"decoder.up_blocks.{b}.resnets."] = f"decoder.up.{n - 1 - b}.block."
        m[f"decoder.up_blocks.{b}.upsamplers.0.conv."] = f"decoder.up.{n - 1 - b}.upsample.conv."
    renames = [
        (r"\.conv_shortcut\.", ".nin_shortcut.", {}),
        (r"attn_1\.group_norm\.", "attn_1.norm.", {}),
        (r"attn_1\.to_(q|k|v)\.", r"attn_1.\1.", {"conv1x1": True}),
        (r"attn_1\.to_out\.0\.", "attn_1.proj_out.", {"conv1x1": True}),
    ]
    return Rules(m, renames, prefix=prefix)


def clip_rules(prefix: str) -> Rules:
    """A transformers-format CLIP text model inside an original file (SD1, SDXL encoder 1); old files lack
    the `text_model.` level."""
    return Rules({}, [], prefix=prefix + "text_model.", alternative_prefixes=(prefix,))


def openclip_rules(prefix: str, projected: bool) -> Rules:
    """OpenCLIP's text tower (SD2's ViT-H, SDXL's bigG): fused in_proj q/k/v, transposed projection."""
    body = "text_model." if projected else ""
    m = {f"{body}embeddings.token_embedding.": "token_embedding.", f"{body}final_layer_norm.": "ln_final.",
         f"{body}encoder.layers.": "transformer.resblocks."}
    renames = [
        (r"^embeddings\.position_embedding\.weight$", "positional_embedding", {}),
        (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding", {}),
        (r"\.self_attn\.q_proj\.(weight|bias)$", r".attn.in_proj_\1", {"chunk": (0, 3)}),
        (r"\.self_attn\.k_proj\.(weight|bias)$", r".attn.in_proj_\1", {"chunk": (1, 3)}),
        (r"\.self_attn\.v_proj\.(weight|bias)$", r".attn.in_proj_\1", {"chunk": (2, 3)}),
        (r"\.self_attn\.out_proj\.", ".attn.out_proj.", {}),
        (r"\.layer_norm1\.", ".ln_1.", {}), (r"\.layer_norm2\.", ".ln_2.", {}),
        (r"\.mlp\.fc1\.", ".mlp.c_fc.", {}), (r"\.mlp\.fc2\.", ".mlp.c_proj.", {}),
        (r"^text_projection\.weight$", "text_projection", {"transpose": True}),
    ]
    return Rules(m, renames, prefix=prefix)


def dit_rules(config) -> Rules:
    """facebookresearch/DiT: one shared t/y embedder (copied into every diffusers block), fused qkv."""
    renames = [
        (r"^pos_embed\.proj\.", "x_embedder.proj.", {}),
        (r"^transformer_blocks\.\d+\.norm1\.emb\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0.", {}),
        (r"^transformer_blocks\.\d+\.norm1\.emb\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2.", {}),
        (r"^transformer_blocks\.\d+\.norm1\.emb\.class_embedder\.", "y_embedder.", {}),
        (r"^transformer_blocks\.(\d+)\.norm1\.linear\.", r"blocks.\1.adaLN_modulation.1.", {}),
        (r"^transformer_blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.attn.qkv.", {"chunk": (0, 3)}),
        (r"^transformer_blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.attn.qkv.", {"chunk": (1, 3)}),
        (r"^transformer_blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.attn.qkv.", {"chunk": (2, 3)}),
        (r"^transformer_blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.attn.proj.", {}),
        (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"blocks.\1.mlp.fc1.", {}),
        (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"blocks.\1.mlp.fc2.", {}),
        (r"^proj_out_1\.", "final_layer.adaLN_modulation.1.", {}),
        (r"^proj_out_2\.", "final_layer.linear.", {}),
    ]
    return Rules({}, renames)


# Original keys no diffusers parameter comes from, and why (anything else unused is an error).
DROPPED = [
    (r"^(model_ema\.|model\.diffusion_model_ema\.)", "EMA copy of the UNet (used with use_ema=True)"),
    (r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
     r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
     r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar)$",
     "noise-schedule buffers (the scheduler recomputes them from its config)"),
    (r"(^|\.)position_ids$", "position-id buffer (recomputed)"),
    (r"\.logit_scale$", "OpenCLIP's contrastive temperature (unused for text conditioning)"),
    (r"\.attn_mask$", "OpenCLIP's causal-mask buffer (recomputed)"),
    (r"^cond_stage_model\.model\.text_projection$", "SD2 conditions on hidden states, not the projection"),
    (r"^cond_stage_model\.model\.transformer\.resblocks\.23\.", "SD2 uses the penultimate layer: layer 23 is unused"),
    (r"^cond_stage_model\.model\.(visual\.|.*visual)", "OpenCLIP image tower"),
    (r"^pos_embed$", "DiT's fixed sin-cos table (recomputed)"),
]


def dropped_reason(key: str) -> str | None:
    return next((reason for pattern, reason in DROPPED if re.search(pattern, key)), None)


def first_few(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else f" ({len(names)})")


def convert_component(original: dict, rules: Rules, expected: dict, what: str) -> tuple[dict, set]:
    """Gather the diffusers state_dict of one component; returns it and the original keys it used."""
    converted, used, missing = {}, set(), []
    for key, shape in expected.items():
        source = rules.source(key)
        tensor = source.fetch(original, shape)
        if tensor is None:
            missing.append(source.keys[0])
            continue
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{what}: {source.keys[0]} has shape {tuple(tensor.shape)} but the model expects "
                                  f"{tuple(shape)} for {key}; the checkpoint is for a different architecture.")
        used.add(next(k for k in source.keys if k in original))
        converted[key] = tensor
    if missing:
        raise CheckpointError(f"{what}: the checkpoint lacks {first_few(missing)}. It is truncated or of "
                              f"another model family; check the file or pass the right config.")
    return converted, used


def export_component(state_dict: dict, rules: Rules) -> dict:
    """The inverse: diffusers tensors -> original keys (fused q/k/v concatenated, shared copies checked)."""
    original, parts = {}, {}
    for key, tensor in state_dict.items():
        source = rules.source(key)
        name = source.keys[0]
        t = tensor.T if source.transpose else tensor
        if source.conv1x1 and t.ndim == 2:
            t = t[:, :, None, None]
        if source.chunk:
            parts.setdefault(name, [None] * source.chunk[1])[source.chunk[0]] = t
        elif name in original:
            if not t.is_meta and not torch.equal(original[name], t):
                raise CheckpointError(f"{key} differs from another parameter stored as {name} in the original "
                                      f"format (DiT's per-block embedders must be equal copies).")
        else:
            original[name] = t.contiguous()
    for name, chunks in parts.items():
        original[name] = torch.cat(chunks, dim=0)
    return original
