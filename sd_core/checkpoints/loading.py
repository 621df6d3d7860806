"""Reading models: diffusers folders, original single files, hub ids (writing is in saving.py).

    pipe = load_pipeline("path/to/stable-diffusion-v1-5")          # a diffusers folder
    pipe = load_pipeline("v1-5-pruned-emaonly.safetensors")         # an original single file
    pipe = load_pipeline("facebook/DiT-XL-2-256")                   # a hub id, where a network exists

Weights are checked key by key: a missing, unexpected or wrongly shaped tensor is an error that
names it. Pickle files (.ckpt/.pt/.bin) are refused unless `allow_pickle=True`, and even then only
tensors are unpickled (`torch.load(weights_only=True)`): no code in the file can run.
"""
import contextlib
import json
import re
from pathlib import Path

import torch

from sd_core.checkpoints import convert
from sd_core.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.checkpoints.weights_files import read_weights
from sd_core.checkpoints.convert import CheckpointError, first_few
from sd_core.models.dit import DIT_SIZES, DiTTransformer2DModel
from sd_core.checkpoints.families import Family, family_of_checkpoint, family_of_folder
from sd_core.checkpoints.hub import fetch_pipeline
from sd_core.tokenizer import CLIPTokenizer
from sd_core.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from sd_core.models.vae import AutoencoderKL, AutoencoderKLConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the names command lines take
MODEL_CLASSES = {  # model_index.json class name -> (sd_core class, weights file stem, library)
    "AutoencoderKL": (AutoencoderKL, "diffusion_pytorch_model", "diffusers"),
    "UNet2DConditionModel": (UNet2DConditionModel, "diffusion_pytorch_model", "diffusers"),
    "DiTTransformer2DModel": (DiTTransformer2DModel, "diffusion_pytorch_model", "diffusers"),
    "Transformer2DModel": (DiTTransformer2DModel, "diffusion_pytorch_model", "diffusers"),  # older DiT folders
    "CLIPTextModel": (CLIPTextModel, "model", "transformers"),
    "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, "model", "transformers"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------- reading


def unwrap(data: dict, use_ema: bool) -> tuple[dict, dict]:
    """Training checkpoints nest the weights: {'state_dict': ...} (LDM) or {'model': ..., 'ema': ...} (DiT)."""
    metadata = {k: v for k, v in data.items() if not torch.is_tensor(v) and not isinstance(v, dict)}
    if use_ema and isinstance(data.get("ema"), dict):
        return data["ema"], metadata
    for key in ("state_dict", "model", "module"):
        if isinstance(data.get(key), dict) and data[key] and all(torch.is_tensor(v) for v in data[key].values()):
            return data[key], metadata
    return {k: v for k, v in data.items() if torch.is_tensor(v)}, metadata


def check_keys(expected: dict, given: dict, what: str):
    """Every expected tensor present with its shape, nothing extra: else one error naming the keys."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [f"{k} {tuple(given[k].shape)} != {tuple(expected[k])}" for k in expected
             if k in given and tuple(given[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {first_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {first_few(wrong)}")
    if problems:
        raise CheckpointError(f"{what} does not match its config: " + "; ".join(problems) +
                              ". The weights are for another architecture, or the file is damaged.")


class SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Random initializers (`normal_`, `uniform_`) do nothing: for modules built on `meta`, whose tensors hold no
    values anyway. torch's meta `normal_` imports sympy on first use: 0.9 s of the app's start, for nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", None) in ("normal_", "uniform_") and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta():
    """Modules built inside are shapes only (meta tensors, initializers skipped): weights are assigned next."""
    with torch.device("meta"), SkipRandomInit():
        yield


def expected_shapes(model_class, config: dict) -> dict:
    with on_meta():
        return {k: tuple(v.shape) for k, v in model_class.from_config(config).state_dict().items()}


def build(model_class, config: dict, state_dict: dict, what: str, dtype=None, device=None):
    """An eval-mode model from config + weights, allocated once (built on `meta`, weights assigned)."""
    with on_meta():
        model = model_class.from_config(config)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict, what)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def normalize_text_encoder_keys(model_class, state_dict: dict) -> dict:
    """The hub's CLIPTextModel files say `text_model.x`; transformers 5 (and sd_core) say `x`."""
    if model_class is CLIPTextModel and any(k.startswith("text_model.") for k in state_dict):
        return {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    return state_dict


# --------------------------------------------------------------------------------------- diffusers folder


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).") from None


def inside(root: Path, path: Path) -> Path:
    """`path`, if it stays inside `root` (a resolved folder) once links are resolved and is a regular file or a
    folder; else an error. Every file a folder loader opens goes through here, so a model's contents (a shard index
    naming ../x, an absolute path, a component folder that is a link out, a FIFO named config.json) can never make
    sd_core read outside the model or block on a read."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise CheckpointError(f"{path.name} in the model folder points outside it (to a path elsewhere on the "
                              f"machine); refused. Copy the file into the model folder instead of linking or "
                              f"naming it.")
    if resolved.exists() and not (resolved.is_file() or resolved.is_dir()):  # reading a FIFO blocks
        raise CheckpointError(f"{path.name} in the model folder is not a regular file (a FIFO, device or socket); "
                              f"refused.")
    return path


def component_weights(folder: Path, stem: str, variant: str | None, allow_pickle: bool, root: Path) -> dict:
    names = [f"{stem}.{variant}.safetensors"] if variant else []
    names.append(f"{stem}.safetensors")
    for name in names:
        if (folder / name).is_file():
            return read_weights(inside(root, folder / name))
        # sharded: diffusers names the variant's index model.safetensors.index.fp16.json
        index = folder / (f"{stem}.safetensors.index.{variant}.json" if variant and variant in name else f"{name}.index.json")
        if index.is_file():
            weight_map = read_json(inside(root, index)).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} has no weight_map of tensor names to shard files.")
            shards = sorted(set(weight_map.values()))
            return {k: v for shard in shards for k, v in read_weights(inside(root, folder / shard)).items()}
    pickled = folder / f"{'pytorch_model' if stem == 'model' else stem}.bin"
    if pickled.is_file():
        return unwrap(read_weights(inside(root, pickled), allow_pickle), use_ema=False)[0]
    raise CheckpointError(f"{folder} has no weights file ({' or '.join(names)}"
                          f"{f' — no variant {variant!r}' if variant else ''}).")


def load_component(folder: Path, class_name: str, dtype, device, variant, allow_pickle, root: Path | None = None):
    if class_name not in MODEL_CLASSES:
        raise CheckpointError(f"{folder.name}: sd_core has no model class {class_name!r}.")
    root = folder.resolve() if root is None else root
    model_class, stem, _ = MODEL_CLASSES[class_name]
    config = read_json(inside(root, folder / "config.json"))
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object of config fields.")
    state_dict = normalize_text_encoder_keys(model_class, component_weights(folder, stem, variant, allow_pickle, root))
    return build(model_class, config, state_dict, f"{folder.name} ({class_name})", dtype, device)


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def readable_root(folder: Path) -> Path:
    """The folder a model folder's files may resolve into: itself, or for a snapshot in huggingface_hub's cache
    (whose files are links into blobs/) the repo's cache folder."""
    is_snapshot = folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")
    return folder.parent.parent if is_snapshot else folder


def load_diffusers_folder(folder: Path, dtype=None, device=None, variant=None, allow_pickle=False,
                          root: Path | None = None):
    """A diffusers pipeline folder. Every file read must lie inside `root`: by default the folder itself, or
    for a snapshot in huggingface_hub's cache (whose files are links into blobs/) the repo's cache folder."""
    folder = Path(folder)
    root = Path(root or readable_root(folder)).resolve()
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder. Pass "
                              f"the pipeline's top folder, or a single .safetensors checkpoint.")
    index = read_json(inside(root, index_path))
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_path} is not a JSON object naming the pipeline's components.")
    pipeline_class = index.get("_class_name", "")

    def component(name):
        entry = index.get(name)
        if entry is None or entry == [None, None] or not (folder / name).is_dir():
            return None
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, (str, type(None))) for e in entry)):
            raise CheckpointError(f"{index_path}: the entry for {name!r} must be [library, class name]; got {entry!r}.")
        inside(root, folder / name)
        if entry[1] in ("CLIPTokenizer", "CLIPTokenizerFast"):
            for file in TOKENIZER_FILES:
                if (folder / name / file).exists():
                    inside(root, folder / name / file)
            return CLIPTokenizer(folder / name)
        return load_component(folder / name, entry[1], dtype, device, variant, allow_pickle, root)

    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(inside(root, scheduler_path)) if scheduler_path.is_file() else {}
    text_encoder, tokenizer = component("text_encoder"), component("tokenizer")
    try:
        family = family_of_folder(pipeline_class, text_encoder.config if text_encoder is not None else None,
                                  tokenizer.pad_token if tokenizer is not None else None)
    except CheckpointError as error:
        raise CheckpointError(f"{folder}: {error}") from None
    if family.denoiser == "transformer":  # class-conditioned: its labels instead of text encoders
        id2label = {int(k): v for k, v in index.get("id2label", {}).items()}
        return DiTPipeline(component("transformer"), component("vae"), scheduler_config, id2label, str(folder))
    return StableDiffusionPipeline(family.name, component("unet"), component("vae"), scheduler_config, text_encoder,
                                   tokenizer, component("text_encoder_2"), component("tokenizer_2"),
                                   str(folder))


# ------------------------------------------------------------------------------------------ single files

def dit_config_from_weights(tensors: dict) -> dict:
    """DiT's architecture read off its tensors (the head count from the paper's sizes)."""
    hidden, in_channels, patch, _ = tensors["x_embedder.proj.weight"].shape
    heads = {width: h for _, width, h in DIT_SIZES.values()}.get(hidden, max(1, hidden // 64))  # not in the weights
    depth = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
    num_patches = tensors["pos_embed"].shape[1] if "pos_embed" in tensors else None
    return {"num_attention_heads": heads, "attention_head_dim": hidden // heads, "num_layers": depth,
            "in_channels": in_channels, "patch_size": patch,
            "out_channels": tensors["final_layer.linear.weight"].shape[0] // (patch * patch),
            "num_embeds_ada_norm": tensors["y_embedder.embedding_table.weight"].shape[0] - 1,
            "sample_size": int(round(num_patches ** 0.5)) * patch if num_patches else 32}


def single_file_layout(family: Family, tensors: dict, configs: dict) -> dict:
    """component -> (sd_core class, config, conversion rules) for an original checkpoint. `configs` may
    give any component's diffusers config; the rest come from the family's released models."""
    if family.denoiser == "transformer":  # DiT's: trained with the original code's timestep frequencies
        config = {**(configs.get("transformer") or dit_config_from_weights(tensors)), "timestep_frequencies": "original"}
        return {"transformer": (DiTTransformer2DModel, config, convert.dit_rules(config))}
    conv_in = tensors.get("model.diffusion_model.input_blocks.0.0.weight")  # 9 input channels: inpainting
    unet_config = configs.get("unet") or {**family.unet, "in_channels": conv_in.shape[1] if conv_in is not None else 4}
    vae_config = configs.get("vae") or family.vae
    layout = {
        "unet": (UNet2DConditionModel, unet_config, convert.unet_rules(UNet2DConditionConfig.from_dict(unet_config))),
        "vae": (AutoencoderKL, vae_config, convert.vae_rules(AutoencoderKLConfig.from_dict(vae_config))),
    }
    for slot in family.text_encoders:
        model_class = CLIPTextModelWithProjection if slot.projected else CLIPTextModel
        layout[slot.component] = (model_class, configs.get(slot.component) or slot.preset, slot.rules())
    return layout


def default_scheduler_config(family: Family, metadata: dict, prediction_type: str | None) -> dict:
    """The family's released scheduler config, or that of the released model the file's training step count
    names (SD 2.x-base's 875k steps)."""
    step = metadata.get("global_step")
    config = dict(next((named for at, named in family.scheduler_by_step.items() if at == step), family.scheduler))
    if prediction_type:
        config["prediction_type"] = prediction_type
    return config


def apply_ema(tensors: dict, used: set) -> dict:
    """LDM files keep EMA weights as `model_ema.` + the UNet key without `model.` and without dots."""
    ema = {}
    for key in used:
        ema_key = "model_ema." + "".join(key.split(".")[1:])
        if ema_key not in tensors:
            raise CheckpointError(f"use_ema was asked for, but the checkpoint has no EMA weights ({ema_key} missing).")
        ema[key] = tensors[ema_key]
    return {**tensors, **ema}


def read_reference_configs(config) -> tuple[dict, dict, dict]:
    """Component configs, scheduler config and id2label from a diffusers folder (or given as a dict)."""
    if config is None:
        return {}, {}, {}
    if isinstance(config, dict):
        return config, {}, {}
    folder = Path(config)
    configs = {p.parent.name: read_json(p) for p in folder.glob("*/config.json")}
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json") \
        if (folder / "scheduler" / "scheduler_config.json").is_file() else {}
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    return configs, scheduler, {int(k): v for k, v in index.get("id2label", {}).items()}


def load_single_file(path, dtype=None, device=None, use_ema=False, config=None, vae=None, prediction_type=None,
                     allow_pickle=False):
    """An original checkpoint: detect the family from its keys, convert by rules, account for every key.
    `config` (a diffusers folder or {component: config}) overrides the released models' architecture."""
    path = Path(path)
    tensors, metadata = unwrap(read_weights(path, allow_pickle), use_ema)
    family, evidence = family_of_checkpoint(tensors)
    configs, scheduler_config, id2label = read_reference_configs(config)
    layout = single_file_layout(family, tensors, configs)
    models, used = {}, set()
    for name, (model_class, model_config, rules) in layout.items():
        state_dict, component_used = convert.convert_component(tensors, rules, expected_shapes(model_class, model_config),
                                                               f"{path.name} [{name}]")
        if use_ema and name == "unet":
            ema_tensors = apply_ema(tensors, component_used)
            state_dict, _ = convert.convert_component(ema_tensors, rules, expected_shapes(model_class, model_config),
                                                      f"{path.name} [unet EMA]")
        used |= component_used
        models[name] = build(model_class, model_config, state_dict, f"{path.name} [{name}]", dtype, device)
    unused = [k for k in tensors if k not in used and convert.dropped_reason(k) is None]
    if unused:
        raise CheckpointError(f"{path.name} (a {family.name} checkpoint, decided by {evidence}) has tensors no part "
                              f"of the model uses: {first_few(unused)}. It is not a plain {family.name} checkpoint; pass "
                              f"config= with the right architecture.")
    scheduler_config = scheduler_config or default_scheduler_config(family, metadata, prediction_type)
    if family.denoiser == "transformer":  # its original files hold no VAE
        vae = load_vae(vae or (Path(config) / "vae" if isinstance(config, (str, Path)) else None), dtype, device)
        return DiTPipeline(models["transformer"], vae, scheduler_config, id2label, str(path))
    # The shipped CLIP vocabulary, padded as each encoder was trained (OpenCLIP's with "!").
    tokenizers = {slot.tokenizer: CLIPTokenizer(pad_token=slot.pad_token) for slot in family.text_encoders}
    return StableDiffusionPipeline(family.name, models["unet"], models["vae"], scheduler_config,
                                   models.get("text_encoder"), tokenizers.get("tokenizer"),
                                   models.get("text_encoder_2"), tokenizers.get("tokenizer_2"), str(path))


def load_vae(vae, dtype=None, device=None) -> AutoencoderKL:
    """An AutoencoderKL from a diffusers `vae/` folder (e.g. the one an original DiT checkpoint needs)."""
    if isinstance(vae, AutoencoderKL):
        return vae.to(device=device, dtype=dtype or torch.float32)
    if vae is None or not (Path(vae) / "config.json").is_file():
        raise CheckpointError(f"No AutoencoderKL folder at {vae}. (An original DiT checkpoint holds no VAE: pass "
                              f"vae=<a diffusers AutoencoderKL folder>, e.g. stabilityai/sd-vae-ft-ema, or "
                              f"config=<a diffusers DiT folder>.)")
    return load_component(Path(vae), "AutoencoderKL", dtype, device, None, False)


# ------------------------------------------------------------------------------------------------ hub


def load_pipeline(source, dtype=None, device=None, variant=None, use_ema=False, config=None, vae=None,
                  prediction_type=None, allow_pickle=False) -> StableDiffusionPipeline | DiTPipeline:
    """Any of: a diffusers pipeline folder, an original single-file checkpoint, a hub repo id."""
    path = Path(source)
    if path.is_dir():
        return load_diffusers_folder(path, dtype, device, variant, allow_pickle)
    if path.is_file():
        return load_single_file(path, dtype, device, use_ema, config, vae, prediction_type, allow_pickle)
    if HUB_ID.match(str(source)):
        return load_from_hub(str(source), dtype, device, variant)
    raise FileNotFoundError(f"{source!r} is neither a folder, a checkpoint file, nor a hub id like 'owner/model'.")


def load_from_hub(repo_id: str, dtype=None, device=None, variant=None, on_file=None):
    """A hub repo id, never looked up on the local disk: fetch the files the pipeline loads (hub.py), then
    read them as a diffusers folder. `on_file(name, index, total, size)` reports each download."""
    if not HUB_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a hub repo id like 'owner/model'.")
    return load_diffusers_folder(fetch_pipeline(repo_id, variant, on_file=on_file), dtype, device, variant)
