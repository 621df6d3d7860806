"""Writing models: diffusers folders that diffusers' own pipelines load unchanged, and original single files.

Nothing is ever half-written: a folder is written into a temporary sibling and moved into place, a file
into a temporary name and renamed.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch

from sd_core.files import atomic_path, ordinary_mode
from sd_core.checkpoints import convert
from sd_core.models.dit import sincos_position_embedding
from sd_core.checkpoints.loading import MODEL_CLASSES, single_file_layout

DIFFUSERS_VERSION = "0.42.1"


def atomic_folder(folder: Path, overwrite: bool):
    """Write into a temporary sibling, then move it into place: never a half-written folder."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it.")
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"The folder {folder.parent} does not exist; create it first.")
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    temporary.chmod(ordinary_mode(is_folder=True))  # mkdtemp makes it private; the result should be an ordinary folder
    return temporary


def commit_folder(temporary: Path, folder: Path):
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(temporary, folder)
        shutil.rmtree(old)
    else:
        os.replace(temporary, folder)


def save_model(model, folder: Path, class_name: str):
    folder.mkdir(parents=True)
    _, stem, library = MODEL_CLASSES[class_name]
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if library == "transformers":
        config = {**model.config.to_dict(), "architectures": [class_name], "model_type": "clip_text_model",
                  "bos_token_id": 49406}
        if class_name == "CLIPTextModel":  # the hub spelling, which transformers 4 and 5 both load
            state_dict = {f"text_model.{k}": v for k, v in state_dict.items()}
    else:
        config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
    safetensors.torch.save_file(state_dict, folder / f"{stem}.safetensors", metadata={"format": "pt"})


def save_pipeline(pipe, folder, overwrite: bool = False) -> Path:
    """Write a diffusers-format folder that diffusers' own pipelines load unchanged."""
    folder = Path(folder)
    temporary = atomic_folder(folder, overwrite)
    try:
        scheduler_config = dict(pipe.scheduler_config)
        scheduler_class = scheduler_config.pop("_class_name", "DDIMScheduler")
        index = {"_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", scheduler_class]}
        for name, model in pipe.models.items():
            class_name = type(model).__name__
            save_model(model, temporary / name, class_name)
            index[name] = ["transformers" if MODEL_CLASSES[class_name][2] == "transformers" else "diffusers",
                           class_name]
        traits = pipe.traits
        index["_class_name"] = traits.diffusers_pipeline
        if traits.denoiser == "transformer":  # class-conditioned: its labels instead of tokenizers
            index["id2label"] = {str(k): v for k, v in pipe.id2label.items()}
        else:
            for name in traits.tokenizer_slots:
                if getattr(pipe, name) is not None:
                    getattr(pipe, name).save(temporary / name)
                    index[name] = ["transformers", "CLIPTokenizer"]
                else:
                    index[name] = [None, None]
            index.setdefault("text_encoder", [None, None])
            if traits.xl:
                index.setdefault("text_encoder_2", [None, None])
                index["force_zeros_for_empty_prompt"] = traits.zeros_for_empty_negative
                index["requires_aesthetics_score"] = traits.requires_aesthetics_score
            else:
                index.update(safety_checker=[None, None], feature_extractor=[None, None],
                             requires_safety_checker=False)
        (temporary / "scheduler").mkdir()
        (temporary / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": scheduler_class, "_diffusers_version": DIFFUSERS_VERSION, **scheduler_config}, indent=2))
        (temporary / "model_index.json").write_text(json.dumps(index, indent=2))
        commit_folder(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder


def export_single_file(pipe, path, overwrite: bool = False) -> Path:
    """Write the pipeline as an original-format .safetensors (CompVis/Stability keys, or DiT's)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    tensors = {}
    configs = {name: model.config.to_dict() for name, model in pipe.models.items()}
    for name, (_, _, rules) in single_file_layout(pipe.traits, {}, configs).items():
        if name in pipe.models:
            tensors.update(convert.export_component(pipe.models[name].state_dict(), rules))
    if pipe.traits.denoiser == "transformer":  # the original DiT code stores its fixed position table too
        c = pipe.transformer.config
        grid = c.sample_size // c.patch_size
        tensors["pos_embed"] = sincos_position_embedding(c.hidden_size, grid, grid, grid)[None]
    with atomic_path(path) as temporary:
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temporary)
    return path
