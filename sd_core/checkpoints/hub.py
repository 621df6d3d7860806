"""Fetch from the Hugging Face Hub only the files an sd_core pipeline loads.

    folder = fetch_pipeline("stabilityai/stable-diffusion-xl-base-1.0", variant="fp16")
    pipe = load_diffusers_folder(folder, variant="fp16")
    folder = fetch_model("lllyasviel/control_v11p_sd15_canny", "ControlNetModel")   # one model at the root

A hub repo holds far more than a pipeline reads: runwayml/stable-diffusion-v1-5 carries two root
checkpoints, fp16/non_ema/.bin twins of every weight and a safety checker, 19.4 GB the pipeline never
uses. This module reads `model_index.json`, then fetches for each component sd_core loads its config
(or tokenizer files) and ONE safetensors weights file of the chosen variant, nothing else. A single-model repo
(a ControlNet: config.json and its weights at the root, next to .bin and fp16 twins and sample images) gets
the same: its config.json, checked to name the expected model, and one safetensors weights file.
"""
import contextlib
import json
import shutil
import warnings
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its connection errors are not OSErrors
import huggingface_hub
from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from tqdm.auto import tqdm

from sd_core.checkpoints.convert import CheckpointError

# model_index.json names of the components sd_core builds; never safety_checker, feature_extractor, image_encoder.
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "transformer")
CONFIG_FILES = {"scheduler": ("scheduler_config.json",),
                "tokenizer": ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")}
CONFIG_FILES["tokenizer_2"] = CONFIG_FILES["tokenizer"]
WEIGHTS_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}  # by the entry's library


@contextlib.contextmanager
def hub_errors(repo_id: str):
    """Offline, unreachable, missing, gated: one CheckpointError that says what to do."""
    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, httpx2.HTTPError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
        raise CheckpointError(f"Could not fetch {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: "
                              f"{first_line}). Check the repo id, your network and, for a gated repo, your token "
                              f"(hf auth login, or HF_TOKEN); without a network, pass a local diffusers folder or a "
                              f"single .safetensors file instead.") from None


def weights_names(stem: str, variant: str | None) -> list[str]:
    """diffusers' names for a weights file or a shard index, the variant's first."""
    names = [f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json",
             f"{stem}.{variant}.safetensors.index.json"] if variant else []
    return names + [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]


def in_folder(folder: str, name: str) -> str:
    """A repo path: `name` inside `folder` ("" is the repo's root)."""
    return f"{folder}/{name}" if folder else name


def shard_files(repo_id: str, index_path: str, revision: str, sizes: dict) -> list[str]:
    """The shards a `*.index.json` names, each checked to be a plain file of the index's own folder."""
    folder = index_path.rpartition("/")[0]
    weight_map = json.loads(Path(hf_hub_download(repo_id, index_path, revision=revision)).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if "/" in shard or "\\" in shard or shard in ("", ".", "..") or in_folder(folder, shard) not in sizes:
            raise CheckpointError(f"{repo_id}: {index_path} names the shard {shard!r}, which is not a file of "
                                  f"{folder or 'the root'}/ in the repo. The index is damaged; pass a local folder "
                                  f"instead.")
    return [in_folder(folder, shard) for shard in shards]


def weights_files(repo_id: str, component: str, stem: str, variant, revision: str, sizes: dict) -> list[str]:
    """One weights file (or a shard index and its shards) of the variant, else the plain one, with a warning."""
    for name in weights_names(stem, variant):
        path = in_folder(component, name)
        if path not in sizes:
            continue
        if variant and f".{variant}." not in name:
            warnings.warn(f"{repo_id}: {component or 'the repo'}/ has no {variant!r} weights; fetching {name} instead.")
        return [path] + (shard_files(repo_id, path, revision, sizes) if name.endswith(".json") else [])
    raise CheckpointError(f"{repo_id}: {component or 'the repo'}/ has no safetensors weights "
                          f"({' or '.join(weights_names(stem, None))}). sd_core fetches safetensors only; "
                          f"convert the weights, or pass a local folder.")


def select_files(repo_id: str, index: dict, variant, revision: str, sizes: dict) -> list[str]:
    """model_index.json plus, per loaded component, its config files and one weights file."""
    selected = ["model_index.json"]
    for component, files in CONFIG_FILES.items():
        if isinstance(index.get(component), list) and index[component][0] is not None:
            selected += [f"{component}/{name}" for name in files if f"{component}/{name}" in sizes]
    for component in MODEL_COMPONENTS:
        entry = index.get(component)
        if not isinstance(entry, list) or entry[0] is None:
            continue
        if f"{component}/config.json" not in sizes:
            raise CheckpointError(f"{repo_id}: model_index.json names {component}, but {component}/config.json "
                                  f"is not in the repo. Pass a local folder instead.")
        stem = WEIGHTS_STEMS.get(entry[0], "diffusion_pytorch_model")
        selected += [f"{component}/config.json", *weights_files(repo_id, component, stem, variant, revision, sizes)]
    return selected


def resolve(repo_id: str, revision: str | None) -> tuple[str, dict]:
    """The commit a revision points at, and every file of that commit with its size."""
    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    return info.sha, {sibling.rfilename: sibling.size for sibling in info.siblings}


def root_json(repo_id: str, name: str, commit: str, sizes: dict, missing: str) -> tuple[Path, dict]:
    """A JSON file at the repo's root (model_index.json, config.json), fetched into the cache and read; `missing`
    is the message when the commit has none."""
    if name not in sizes:
        raise CheckpointError(missing)
    path = Path(hf_hub_download(repo_id, name, revision=commit))
    return path, json.loads(path.read_text())


def plan(repo_id: str, variant, revision) -> tuple[str, Path, list[tuple[str, int]]]:
    """(commit, its local snapshot folder, [(path, size)] to fetch); reads model_index.json into the cache."""
    with hub_errors(repo_id):
        commit, sizes = resolve(repo_id, revision)
        index_path, index = root_json(repo_id, "model_index.json", commit, sizes,
                                      f"{repo_id} has no model_index.json, so it is not a diffusers pipeline repo. "
                                      f"Download its single .safetensors checkpoint and pass that file instead.")
        files = select_files(repo_id, index, variant, commit, sizes)
    return commit, index_path.parent, [(path, sizes[path]) for path in files]


def plan_model(repo_id: str, class_name: str, variant, revision) -> tuple[str, Path, list[tuple[str, int]]]:
    """plan() for a single-model repo: reads its config.json into the cache and checks it names `class_name`
    before any weights are chosen."""
    with hub_errors(repo_id):
        commit, sizes = resolve(repo_id, revision)
        config_path, config = root_json(repo_id, "config.json", commit, sizes,
                                        f"{repo_id} has no config.json at its root, so it is not a diffusers "
                                        f"{class_name} repo. Download its .safetensors file and pass that file instead.")
        found = config.get("_class_name")
        if found != class_name:
            raise CheckpointError(f"{repo_id} holds a {found or 'model of no named class'}, not a {class_name}; "
                                  f"pass a {class_name} repo.")
        files = ["config.json", *weights_files(repo_id, "", "diffusion_pytorch_model", variant, commit, sizes)]
    return commit, config_path.parent, [(path, sizes[path]) for path in files]


def plan_pipeline_files(repo_id: str, variant: str | None = None,
                        revision: str | None = None) -> list[tuple[str, int]]:
    """(path in repo, size in bytes) of every file `fetch_pipeline` would fetch. Downloads only
    model_index.json and shard indexes (a few kB), to read what they name."""
    return plan(repo_id, variant, revision)[2]


def check_free_space(repo_id: str, missing_bytes: int, cache_dir: Path):
    """Refuse, before the first weights file, a download the cache's disk cannot hold."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
    if missing_bytes > free:
        raise CheckpointError(f"Fetching {repo_id} needs {missing_bytes:,} bytes ({missing_bytes / 1e9:.2f} GB) in "
                              f"{cache_dir}, but only {free:,} bytes ({free / 1e9:.2f} GB) are free. Free some space "
                              f"or point HF_HUB_CACHE at a bigger disk. Only model_index.json was downloaded.")


def fetch_pipeline(repo_id: str, variant: str | None = None, revision: str | None = None, progress: bool = True,
                   on_file=None) -> Path:
    """Download the files an sd_core pipeline loads from a hub repo; return the local snapshot folder
    (huggingface_hub's cache layout, one folder per commit, readable by `load_diffusers_folder`).

    `on_file(name, index, total, size)` is called before each file that still has to be downloaded.
    """
    return download(repo_id, *plan(repo_id, variant, revision), progress, on_file)


def fetch_model(repo_id: str, class_name: str, variant: str | None = None, revision: str | None = None,
                progress: bool = True, on_file=None) -> Path:
    """Download a single-model repo's config.json (which must name `class_name`) and one safetensors weights file
    of the variant; return the snapshot folder. `on_file` as for fetch_pipeline."""
    return download(repo_id, *plan_model(repo_id, class_name, variant, revision), progress, on_file)


def download(repo_id: str, commit: str, snapshot: Path, files: list, progress: bool, on_file) -> Path:
    """Fetch the planned files the cache lacks, after checking the disk can hold them; return the snapshot."""
    missing = [(path, size) for path, size in files
               if not isinstance(try_to_load_from_cache(repo_id, path, revision=commit), str)]
    check_free_space(repo_id, sum(size for _, size in missing), Path(huggingface_hub.constants.HF_HUB_CACHE))
    silent_bar = None if progress else lambda *args, **kwargs: tqdm(*args, **kwargs, disable=True)
    with hub_errors(repo_id):
        for number, (path, size) in enumerate(missing, 1):
            if on_file is not None:
                on_file(path, number, len(missing), size)
            hf_hub_download(repo_id, path, revision=commit, tqdm_class=silent_bar)
    return snapshot
