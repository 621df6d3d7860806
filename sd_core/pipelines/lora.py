"""LoRA: low-rank weight updates from kohya/A1111 and diffusers/PEFT files, merged into sd_core's models.

    lora = load_lora("style.safetensors")
    applied = apply_loras(pipe.models, [(lora, 0.8), (load_lora("detail.safetensors"), 0.5)])
    result = text_to_image(pipe, "a cat", seed=1)
    remove_loras(applied)                      # the base weights again, bit for bit

A LoRA layer adapts one Linear or Conv2d (weight W) with `down` (rank, in[, kh, kw]) and `up`
(out, rank[, 1, 1]); merged at a user's `scale`:  W <- W + scale * (alpha / rank) * up @ down.

Formats (one file holds one):
- kohya / A1111: `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, optional `.alpha` (absent: alpha =
  rank); `lora_te_` for SD1/2's text encoder, `lora_te1_`/`lora_te2_` for SDXL's two. The path is the module's
  name with `_` for `.`: diffusers' UNet names (SD1/2) or the original LDM ones (SDXL: `input_blocks_4_1_...`).
  Conv layers (LoCon) have a kxk `down` and a 1x1 `up`.
- diffusers / PEFT: `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.`, `text_encoder_2.`; alpha
  comes from the file's `lora_adapter_metadata` (`unet.lora_alpha`, `unet.alpha_pattern`), else alpha = rank.
  Older diffusers files say `.lora.down.weight`, `.lora_linear_layer.down.weight`, or name attention
  processors: `attn1.processor.to_q_lora.down.weight` (UNet), `self_attn.to_q_lora.down.weight` (text).

Files name modules by the reference's parameter names, which are sd_core's (Contract 1), so a name is looked
up among the model's own `named_modules` in each spelling; no key table. Every key must be used: anything
unknown or unmatched is a `CheckpointError` naming it.
"""
import dataclasses
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sd_core.checkpoints import convert
from sd_core.checkpoints.convert import CheckpointError, first_few
from sd_core.checkpoints.weights_files import read_safetensors_header, read_weights

KOHYA_COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2"}
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DIFFUSERS_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
                   "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
                   "lora_linear_layer.up.weight": "up"}
# diffusers' old attention-processor LoRAs name the processor, not the layer they adapt.
PROCESSOR_LAYERS = {"unet": {"processor.to_q_lora": "to_q", "processor.to_k_lora": "to_k",
                             "processor.to_v_lora": "to_v", "processor.to_out_lora": "to_out.0"},
                    "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj",
                             "to_out_lora": "out_proj"}}
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights writes each component's LoraConfig
MAX_LORA_TENSORS = 20_000  # a LoRA of 10^6 tiny tensors took 35 s and 3 GB per request
MAX_LORA_HEADER_BYTES = 32 * 2 ** 20  # 20,000 tensor entries and kohya's training metadata fit with room to spare


@dataclasses.dataclass
class LoRALayer:
    component: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # the adapted module's name as the file spells it (kohya: `_` for `.`)
    down: torch.Tensor  # (rank, in[, kh, kw])
    up: torch.Tensor  # (out, rank[, 1, 1])
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float, weight: torch.Tensor) -> torch.Tensor:
        """scale * (alpha / rank) * up @ down in float32, shaped like `weight`."""
        product = self.up.flatten(1).to(weight.device, torch.float32) @ self.down.flatten(1).to(weight.device,
                                                                                              torch.float32)
        return (product * (scale * self.alpha / self.rank)).reshape(weight.shape)


@dataclasses.dataclass
class LoRA:
    layers: dict[str, LoRALayer]  # the file's key stem (e.g. `lora_unet_conv_in`) -> layer
    source: str  # the file, for messages


@dataclasses.dataclass
class AppliedLoRAs:
    """What `apply_loras` changed: each touched module with its weight from before, to restore exactly."""
    originals: dict[str, tuple[nn.Module, torch.Tensor]]  # "component.module" -> (module, original weight)


# -------------------------------------------------------------------------------------------------- reading


def load_lora(source, allow_pickle: bool = False) -> LoRA:
    """Parse a LoRA file (or a state dict) of either format; nothing is checked against a model yet. A file's
    tensors are counted from its header before any is read: at most MAX_LORA_TENSORS."""
    if isinstance(source, dict):
        return parse_lora(count_tensors(source, "the given state dict"), {}, "the given state dict")
    path = Path(source)
    metadata = {}
    if path.suffix == ".safetensors":
        names, header = read_safetensors_header(path, max_bytes=MAX_LORA_HEADER_BYTES)
        count_tensors(names, path.name)
        try:
            metadata = json.loads(header.get(METADATA_KEY) or "{}")
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{path.name}: its {METADATA_KEY} is not a JSON object; the file is damaged.")
    return parse_lora(count_tensors(read_weights(path, allow_pickle), path.name), metadata, str(path))


def count_tensors(tensors, name: str):
    """`tensors` (names or a dict) when they are few enough for a LoRA; else an error stating the bound."""
    if len(tensors) > MAX_LORA_TENSORS:
        raise CheckpointError(f"{name} holds {len(tensors)} tensors; a LoRA has at most {MAX_LORA_TENSORS} here "
                              f"(one for SDXL's UNet and both text encoders has a few thousand): refused before loading them.")
    return tensors


def is_lora(keys) -> bool:
    """Whether tensor names are a LoRA's (kohya/A1111 or diffusers/PEFT) rather than a model's."""
    return any(key.startswith(tuple(KOHYA_COMPONENTS)) or key.endswith(tuple(DIFFUSERS_PARTS)) for key in keys)


def parse_lora(tensors: dict, metadata: dict, source: str) -> LoRA:
    if tensors and all(k.startswith(tuple(KOHYA_COMPONENTS)) for k in tensors):
        parts, unknown = group_kohya(tensors)
    else:
        parts, unknown = group_diffusers(tensors)
    if unknown:
        raise CheckpointError(f"{source}: keys that are not LoRA weights of a known format: {first_few(unknown)}. "
                              f"sd_core reads kohya (`lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`) "
                              f"and diffusers/PEFT (`unet.*.lora_A.weight`, `.lora_B.weight`) LoRAs; DoRA, LoHa "
                              f"and LoKr are not supported.")
    if not parts:
        raise CheckpointError(f"{source} holds no LoRA weights.")
    layers = {stem: make_layer(stem, component, module, found, metadata, source)
              for stem, (component, module, found) in parts.items()}
    return LoRA(layers, source)


def group_kohya(tensors: dict) -> tuple[dict, list]:
    """{key stem: (component, module, {"down"|"up"|"alpha": tensor})} and the keys that fit no pattern."""
    parts, unknown = {}, []
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        prefix = next((p for p in KOHYA_COMPONENTS if stem.startswith(p)), None)
        if part not in KOHYA_PARTS or prefix is None:
            unknown.append(key)
            continue
        entry = parts.setdefault(stem, (KOHYA_COMPONENTS[prefix], stem.removeprefix(prefix), {}))
        entry[2][KOHYA_PARTS[part]] = tensor
    return parts, unknown


def group_diffusers(tensors: dict) -> tuple[dict, list]:
    parts, unknown = {}, []
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        split = split_diffusers_key(component, rest) if component in DIFFUSERS_COMPONENTS else None
        if split is None:
            unknown.append(key)
            continue
        module, part = split
        parts.setdefault(f"{component}.{module}", (component, module, {}))[2][part] = tensor
    return parts, unknown


def split_diffusers_key(component: str, rest: str) -> tuple[str, str] | None:
    """(module, "down" | "up") of a diffusers-format key after its component, or None if it is none.

    Processor names become the layer they adapt: `attn1.processor.to_q_lora` -> `attn1.to_q` (UNet),
    `self_attn.to_q_lora` -> `self_attn.q_proj` (text encoders).
    """
    for suffix, part in DIFFUSERS_PARTS.items():
        if rest.endswith("." + suffix):
            return rest.removesuffix("." + suffix), part
    module, _, part = rest.removesuffix(".weight").rpartition(".")
    for old, new in PROCESSOR_LAYERS["unet" if component == "unet" else "text"].items():
        if part in ("down", "up") and rest.endswith(".weight") and module.endswith("." + old):
            return module.removesuffix(old) + new, part
    return None


def make_layer(stem: str, component: str, module: str, found: dict, metadata: dict, source: str) -> LoRALayer:
    missing = [f"{stem}.{part}" for part in ("down", "up") if part not in found]
    if missing:
        raise CheckpointError(f"{source}: {', '.join(missing)} (the other half of a LoRA pair) is missing; "
                              f"the file is damaged.")
    down, up = found["down"], found["up"]
    if up.ndim not in (2, 4) or down.ndim != up.ndim or up.shape[1] != down.shape[0] or math.prod(up.shape[2:]) != 1:
        raise CheckpointError(f"{source}: {stem} has up {tuple(up.shape)} and down {tuple(down.shape)}, which do not "
                              f"make a LoRA pair (up: (out, rank[, 1, 1]), down: (rank, in[, kh, kw])).")
    if "alpha" in found:
        alpha = float(found["alpha"])
    else:
        alpha = peft_alpha(metadata, component, module, rank=down.shape[0])
    return LoRALayer(component, module, down, up, alpha)


def peft_alpha(metadata: dict, component: str, module: str, rank: int) -> float:
    """The module's alpha from diffusers' saved LoraConfig, matched as PEFT matches `alpha_pattern`; else rank."""
    if metadata.get(f"{component}.use_dora") or metadata.get(f"{component}.use_rslora"):
        raise CheckpointError(f"{component}: DoRA and rsLoRA adapters are not supported; merge the LoRA with PEFT "
                              f"and load the merged model instead.")
    for pattern, alpha in (metadata.get(f"{component}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(metadata.get(f"{component}.lora_alpha", rank))


# ------------------------------------------------------------------------------------------------- applying


def module_spellings(component: str, model: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may use for one of `model`'s Linear/Conv2d layers -> sd_core's name for it.

    Dotted and with `_` for `.` (kohya); text encoders' without `text_model.` (transformers 5 dropped it from
    CLIPTextModel, files keep it); the UNet's also in the original LDM layout (kohya's SDXL files).
    """
    ldm = convert.unet_rules(model.config) if component == "unet" else None
    spellings = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        names = [name.removeprefix("text_model.")]
        if ldm is not None:
            names.append(ldm.source(f"{name}.weight").keys[0].removeprefix(ldm.prefix).removesuffix(".weight"))
        for spelled in names:
            spellings[spelled] = spellings[spelled.replace(".", "_")] = name
    return spellings


def resolve(loras: list[tuple[LoRA, float]], models: dict[str, nn.Module]) -> list[tuple[str, nn.Module, LoRALayer,
                                                                                       float]]:
    """(component.module, module, layer, scale) for every layer of every LoRA, or an error naming what does not fit."""
    spellings = {component: module_spellings(component, model) for component, model in models.items()}
    resolved, problems = [], []
    for lora, scale in loras:
        for stem, layer in lora.layers.items():
            if layer.component not in models:
                problems.append(f"{stem} (the pipeline has no {layer.component})")
                continue
            name = spellings[layer.component].get(layer.module.removeprefix("text_model.").removeprefix("text_model_"))
            if name is None:
                problems.append(f"{stem} (no such Linear or Conv2d in the {layer.component})")
                continue
            module = models[layer.component].get_submodule(name)
            out_features, in_features = module.weight.shape[0], module.weight[0].numel()
            if (layer.up.shape[0], layer.down[0].numel()) != (out_features, in_features):
                problems.append(f"{stem} (up {tuple(layer.up.shape)} @ down {tuple(layer.down.shape)} does not fit "
                                f"{layer.component}.{name}.weight {tuple(module.weight.shape)})")
                continue
            resolved.append((f"{layer.component}.{name}", module, layer, scale))
        if problems:
            raise CheckpointError(f"{lora.source} does not fit this model: {first_few(problems)}. It was made for "
                                  f"another model family (SD1 / SD2 / SDXL) or architecture.")
    return resolved


@torch.no_grad()
def apply_loras(models: dict[str, nn.Module], loras: list[tuple[LoRA, float]]) -> AppliedLoRAs:
    """Merge each LoRA at its scale into `models` ({"unet": ..., "text_encoder": ..., "text_encoder_2": ...}).

    All layers are checked before any weight changes. Several LoRAs add up, in the order given. Remove them with
    `remove_loras` (several applied sets: in reverse order).
    """
    originals = {}
    for name, module, layer, scale in resolve(loras, models):
        weight = module.weight
        originals.setdefault(name, (module, weight.detach().to("cpu", copy=True)))
        weight.copy_((weight.float() + layer.delta(scale, weight)).to(weight.dtype))
    return AppliedLoRAs(originals)


@torch.no_grad()
def remove_loras(applied: AppliedLoRAs):
    """Put back the weights `apply_loras` changed, exactly as they were."""
    for module, original in applied.originals.values():
        module.weight.copy_(original)
    applied.originals.clear()


@contextmanager
def loras_applied(models: dict[str, nn.Module], loras: list[tuple[LoRA, float]]):
    """`with loras_applied(pipe.models, [(lora, 0.8)]): ...` merges for the block, then restores the base."""
    applied = apply_loras(models, loras)
    try:
        yield applied
    finally:
        remove_loras(applied)
