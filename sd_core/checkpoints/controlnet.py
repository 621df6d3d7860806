"""Reading ControlNets: a diffusers folder, or one .safetensors file in diffusers' or the original key layout.

    controlnet = load_controlnet("path/to/control_v11p_sd15_canny")        # config.json + diffusion_pytorch_model
    controlnet = load_controlnet("control_v11p_sd15_canny.safetensors")    # lllyasviel's control_model.* keys
    controlnet = load_controlnet("diffusers_xl_canny_mid.safetensors")     # diffusers' keys, no config.json
    controlnet = load_controlnet("lllyasviel/control_v11p_sd15_canny")     # a hub repo: config.json + one file

A single file carries no config: its architecture is the released one its cross-attention width names, with the
input and hint channels, the projection kind and the transformer depths read off its tensors (`config=` gives
any other). Every tensor is accounted for: a missing, unexpected or wrongly shaped one is an error naming it.
"""
import itertools
import json
from pathlib import Path

import safetensors.torch

from sd_core.checkpoints import convert
from sd_core.checkpoints.convert import CheckpointError, first_few
from sd_core.checkpoints.hub import fetch_model
from sd_core.checkpoints.loading import (HUB_ID, build, component_weights, expected_shapes, inside, read_json,
                                        readable_root, unwrap)
from sd_core.checkpoints.saving import DIFFUSERS_VERSION, atomic_folder, commit_folder
from sd_core.checkpoints.weights_files import read_weights
from sd_core.models import presets
from sd_core.models.controlnet import ControlNetConfig, ControlNetModel

PRESETS_BY_CROSS_ATTENTION = {768: presets.CONTROLNET_SD15, 1024: presets.CONTROLNET_SD21,
                              2048: presets.CONTROLNET_SDXL}
DIFFUSERS_EVIDENCE = "controlnet_cond_embedding.conv_in.weight"  # only diffusers' layout has this name


def load_controlnet(source, dtype=None, device=None, config=None, variant=None,
                    allow_pickle=False) -> ControlNetModel:
    """An eval-mode ControlNetModel from a diffusers folder, a single weights file or a hub repo id (its
    config.json and one safetensors file of the variant are fetched, never its .bin or other twins). `config`: a
    diffusers ControlNet config (a dict, or a config.json path) for a single file of an unreleased architecture."""
    path = Path(source)
    if path.is_dir():
        return load_controlnet_folder(path, dtype, device, variant, allow_pickle)
    if path.is_file():
        if isinstance(config, (str, Path)):
            config = read_json(Path(config))
        return load_controlnet_file(path, dtype, device, config, allow_pickle)
    if HUB_ID.match(str(source)):
        return load_controlnet_folder(fetch_model(str(source), "ControlNetModel", variant), dtype, device, variant)
    raise FileNotFoundError(f"{source!r} is neither a ControlNet folder (config.json and its weights), a weights "
                            f"file, nor a hub repo id like 'lllyasviel/control_v11p_sd15_canny'.")


def load_controlnet_folder(folder: Path, dtype=None, device=None, variant=None, allow_pickle=False):
    root = readable_root(folder).resolve()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json, so it is not a diffusers ControlNet folder. Pass the "
                              f"folder holding config.json and diffusion_pytorch_model.safetensors, or a single "
                              f".safetensors file.")
    config = read_json(inside(root, config_path))
    if not isinstance(config, dict) or config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        kind = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{config_path} describes a {kind}, not a ControlNetModel; pass a ControlNet folder.")
    state_dict = component_weights(folder, "diffusion_pytorch_model", variant, allow_pickle, root)
    return build(ControlNetModel, config, state_dict, f"{folder.name} (ControlNetModel)", dtype, device)


def load_controlnet_file(path: Path, dtype=None, device=None, config: dict | None = None, allow_pickle=False):
    """One weights file: diffusers' keys are loaded as they are, the original ones converted by
    `convert.controlnet_rules`; a tensor no parameter comes from is an error, never dropped."""
    tensors = unwrap(read_weights(path, allow_pickle), use_ema=False)[0]
    what = f"{path.name} [controlnet]"
    config = dict(config) if config else controlnet_config_from_weights(tensors, what)
    if DIFFUSERS_EVIDENCE in tensors:
        return build(ControlNetModel, config, tensors, what, dtype, device)
    rules = convert.controlnet_rules(ControlNetConfig.from_dict(config))
    state_dict, used = convert.convert_component(tensors, rules, expected_shapes(ControlNetModel, config), what)
    unused = [key for key in tensors if key not in used]
    if unused:
        raise CheckpointError(f"{what} has tensors no part of the ControlNet uses: {first_few(unused)}. It is not a "
                              f"plain ControlNet (e.g. a whole SD checkpoint with one inside: keep only its "
                              f"control_model.* tensors), or not of the architecture assumed; pass config=.")
    return build(ControlNetModel, config, state_dict, what, dtype, device)


def controlnet_config_from_weights(tensors: dict, what: str) -> dict:
    """The released ControlNet architecture a file's cross-attention width names (768: SD 1.x, 1024: SD 2.x,
    2048: SDXL), with what its tensors say: input and hint channels, linear or 1x1-conv projections, which levels
    have transformers and how deep (SDXL's full, mid and small ControlNets differ there)."""
    width = next((t.shape[1] for k, t in tensors.items() if k.endswith("attn2.to_k.weight") and t.ndim == 2), None)
    if width not in PRESETS_BY_CROSS_ATTENTION:
        raise CheckpointError(f"{what}: its cross-attention width ({width}) is not that of a released SD 1.x (768), "
                              f"2.x (1024) or SDXL (2048) ControlNet; pass config= with its diffusers config.json.")
    config = dict(PRESETS_BY_CROSS_ATTENTION[width])
    rules = convert.controlnet_rules(ControlNetConfig.from_dict(config))

    def find(key: str):
        if DIFFUSERS_EVIDENCE in tensors:
            return tensors.get(key)
        return next((tensors[k] for k in rules.source(key).keys if k in tensors), None)

    def depth(attention: str) -> int:
        return next(k for k in itertools.count() if find(f"{attention}.transformer_blocks.{k}.norm1.weight") is None)

    required = ["conv_in.weight", "controlnet_cond_embedding.conv_in.weight", "mid_block.attentions.0.proj_in.weight"]
    missing = [key for key in required if find(key) is None]
    if missing:
        raise CheckpointError(f"{what} is not a ControlNet: it lacks {first_few(missing)} (or their original "
                              f"names). Pass a ControlNet's weights.")
    levels = len(config["block_out_channels"])
    has_attention = [find(f"down_blocks.{b}.attentions.0.norm.weight") is not None for b in range(levels)]
    mid_depth = depth("mid_block.attentions.0")
    return {**config, "in_channels": find("conv_in.weight").shape[1],
            "conditioning_channels": find("controlnet_cond_embedding.conv_in.weight").shape[1],
            "use_linear_projection": find("mid_block.attentions.0.proj_in.weight").ndim == 2,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
            # diffusers gives the last level's depth to the mid block too
            "transformer_layers_per_block": [depth(f"down_blocks.{b}.attentions.0") if has_attention[b] else 1
                                             for b in range(levels - 1)] + [mid_depth]}


def save_controlnet(controlnet: ControlNetModel, folder, overwrite: bool = False) -> Path:
    """A diffusers ControlNet folder (config.json, diffusion_pytorch_model.safetensors) that diffusers'
    ControlNetModel.from_pretrained and load_controlnet both read; written whole or not at all."""
    folder = Path(folder)
    temporary = atomic_folder(folder, overwrite)
    config = {"_class_name": "ControlNetModel", "_diffusers_version": DIFFUSERS_VERSION,
              **controlnet.config.to_dict()}
    (temporary / "config.json").write_text(json.dumps(config, indent=2, default=list))
    state_dict = {k: v.detach().contiguous().cpu() for k, v in controlnet.state_dict().items()}
    safetensors.torch.save_file(state_dict, temporary / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    commit_folder(temporary, folder)
    return folder
