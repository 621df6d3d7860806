"""sd_core.checkpoints.hub through the real huggingface_hub client, against a loopback fake Hub (tests/fake_hub.py)
serving the real layouts of SD 1.5, SDXL base and two ControlNet repos: exactly the files that are loaded are
fetched."""
import functools
import json
import shutil

import huggingface_hub
import pytest
import safetensors.torch
import torch

from sd_core.checkpoints.controlnet import load_controlnet
from sd_core.checkpoints.convert import CheckpointError
from sd_core.checkpoints.hub import fetch_pipeline, plan_pipeline_files
from sd_core.checkpoints.loading import load_diffusers_folder
from tests.fake_hub import FakeHub, real_repo, repo_with_tiny_controlnet, repo_with_tiny_pipeline

SD15, SDXL = "runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
CANNY_SD15, CANNY_SDXL = "lllyasviel/control_v11p_sd15_canny", "diffusers/controlnet-canny-sdxl-1.0"
OLD_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.safetensors.index.json"]  # loading.download before #17
TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")


@functools.lru_cache()
def served_repo(repo_id: str) -> dict:
    return repo_with_tiny_controlnet(repo_id) if repo_id in (CANNY_SD15, CANNY_SDXL) else repo_with_tiny_pipeline(repo_id)


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """serve(repos, gated=()) starts a FakeHub and points huggingface_hub at it: online (conftest sets
    HF_HUB_OFFLINE=1 for the suite), with an empty cache under tmp_path."""
    constants = huggingface_hub.constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    hubs = []

    def start(repos: dict, gated: tuple = ()) -> FakeHub:
        hub = FakeHub(repos, gated).__enter__()
        hubs.append(hub)
        # huggingface_hub reads HF_ENDPOINT once, at import, into these two constants.
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        return hub

    yield start
    for hub in hubs:
        hub.__exit__(None, None, None)


def fetched(hub: FakeHub) -> list[str]:
    """The files whose bytes were sent."""
    return [path for path, _ in hub.downloads]


def looked_up(hub: FakeHub) -> list[str]:
    """The files the client asked about (HEAD), downloaded or found in the cache."""
    return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in hub.requests
            if method == "HEAD" and "/resolve/" in path]


def assert_nothing_unused(paths):
    for path in paths:
        assert "/" in path or path == "model_index.json", f"a root file was fetched: {path}"
        assert not path.endswith(".bin") and "non_ema" not in path, path
        assert path.split("/")[0] not in ("safety_checker", "feature_extractor"), path


def assert_loaded_weights_are(model, files: dict, path: str):
    """The model holds the served file's tensors (CLIP files may or may not say `text_model.`)."""
    served = {k.removeprefix("text_model."): v for k, v in safetensors.torch.load(files[path]).items()}
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    assert set(state) == set(served)
    assert all(torch.equal(state[k], served[k].float()) for k in served)


def test_sd15_fetches_one_weights_file_and_the_configs_of_each_loaded_component(serve):
    files = served_repo(SD15)
    hub = serve({SD15: files})
    calls = []
    folder = fetch_pipeline(SD15, progress=False, on_file=lambda *call: calls.append(call))

    expected = {"model_index.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "text_encoder/model.safetensors",
                *(f"tokenizer/{name}" for name in TOKENIZER_FILES),
                "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    assert sorted(fetched(hub)) == sorted(expected)  # each exactly once
    assert hub.bytes_served == sum(len(files[path]) for path in expected)
    assert_nothing_unused(fetched(hub))
    # model_index.json is read while planning; the callback sees the other files, numbered.
    assert [(name, index, total) for name, index, total, _ in calls] == \
        [(name, i, len(expected) - 1) for i, name in enumerate(fetched(hub)[1:], 1)]
    assert sum(size for *_, size in calls) == hub.bytes_served - len(files["model_index.json"])

    assert folder.name == hub.commits[SD15] and folder.parent.name == "snapshots"
    pipe = load_diffusers_folder(folder)
    assert_loaded_weights_are(pipe.unet, files, "unet/diffusion_pytorch_model.safetensors")
    assert_loaded_weights_are(pipe.text_encoder, files, "text_encoder/model.safetensors")


def test_sdxl_base_fetches_fp32_then_only_the_fp16_weights_for_variant_fp16(serve):
    files = served_repo(SDXL)
    hub = serve({SDXL: files})
    configs = {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
               "text_encoder_2/config.json", "unet/config.json", "vae/config.json",
               *(f"{folder}/{name}" for folder in ("tokenizer", "tokenizer_2") for name in TOKENIZER_FILES)}
    weights = ["text_encoder/model{}.safetensors", "text_encoder_2/model{}.safetensors",
               "unet/diffusion_pytorch_model{}.safetensors", "vae/diffusion_pytorch_model{}.safetensors"]
    fp32, fp16 = {w.format("") for w in weights}, {w.format(".fp16") for w in weights}

    folder = fetch_pipeline(SDXL, progress=False)
    assert sorted(looked_up(hub)) == sorted(configs | fp32)
    # tokenizer_2's vocab.json and merges.txt are byte-equal to tokenizer's: the client links the cached blob.
    downloaded = (configs | fp32) - {"tokenizer_2/vocab.json", "tokenizer_2/merges.txt"}
    assert sorted(fetched(hub)) == sorted(downloaded)
    assert hub.bytes_served == sum(len(files[path]) for path in downloaded)
    assert_nothing_unused(fetched(hub))
    assert not any(path.startswith("vae_1_0/") for path in fetched(hub))  # not a component of the pipeline

    hub.downloads.clear()
    assert {path for path, _ in plan_pipeline_files(SDXL, variant="fp16")} == configs | fp16
    assert fetch_pipeline(SDXL, variant="fp16", progress=False) == folder  # same snapshot folder
    assert sorted(fetched(hub)) == sorted(fp16)  # model_index.json and the configs are cached already

    pipe = load_diffusers_folder(folder, variant="fp16")
    assert pipe.family == "sdxl"
    assert_loaded_weights_are(pipe.unet, files, "unet/diffusion_pytorch_model.fp16.safetensors")
    assert_loaded_weights_are(pipe.text_encoder_2, files, "text_encoder_2/model.fp16.safetensors")


def test_a_missing_variant_falls_back_to_the_plain_weights_with_a_warning(serve):
    repo = real_repo(SD15)
    del repo["vae/diffusion_pytorch_model.fp16.safetensors"]
    serve({SD15: repo})
    with pytest.warns(UserWarning, match=r"vae/ has no 'fp16' weights; fetching diffusion_pytorch_model.safetensors"):
        plan = dict(plan_pipeline_files(SD15, variant="fp16"))
    assert "vae/diffusion_pytorch_model.safetensors" in plan
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in plan


def sharded_repo(shard_names: list[str]) -> dict:
    index = {"metadata": {}, "weight_map": {f"w{i}": name for i, name in enumerate(shard_names)}}
    return {"model_index.json": json.dumps({"_class_name": "DiTPipeline",
                                            "transformer": ["diffusers", "DiTTransformer2DModel"]}).encode(),
            "transformer/config.json": b"{}", "transformer/diffusion_pytorch_model.bin": 10,
            "transformer/diffusion_pytorch_model.safetensors.index.json": json.dumps(index).encode(),
            **{f"transformer/{name}": 100 for name in shard_names if name.startswith("diffusion_pytorch_model-")}}


def test_sharded_weights_fetch_the_index_and_the_shards_it_names(serve):
    shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    hub = serve({"org/dit": sharded_repo(shards)})
    assert [path for path, _ in plan_pipeline_files("org/dit")] == \
        ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
         *(f"transformer/{name}" for name in shards)]
    assert sorted(fetched(hub)) == ["model_index.json", "transformer/diffusion_pytorch_model.safetensors.index.json"]


@pytest.mark.parametrize("bad_shard", ["../unet/diffusion_pytorch_model.safetensors", "/etc/passwd", "..",
                                       "not-in-the-repo.safetensors"])
def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(serve, bad_shard):
    serve({"org/dit": sharded_repo(["diffusion_pytorch_model-00001-of-00002.safetensors", bad_shard])})
    with pytest.raises(CheckpointError, match="names the shard .* not a file of transformer/"):
        plan_pipeline_files("org/dit")


def test_old_download_against_new_fetch_in_bytes_on_the_real_layouts(serve, capsys):
    """The figure for issue 17's closing note: snapshot_download with loading.download's old patterns
    (dry run: what it would fetch into an empty cache) against plan_pipeline_files, real sizes."""
    hub = serve({SD15: real_repo(SD15), SDXL: real_repo(SDXL)})
    rows = {}
    for repo_id, variant in ((SD15, None), (SDXL, None), (SDXL, "fp16")):
        patterns = [p.replace("*.safetensors", f"*.{variant}.safetensors") if variant else p for p in OLD_PATTERNS]
        old = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, dry_run=True)
        new = plan_pipeline_files(repo_id, variant=variant)
        rows[repo_id, variant] = (len(old), sum(f.file_size for f in old), len(new), sum(size for _, size in new))
    with capsys.disabled():
        print("\nrepo, variant: old loading.download -> sd_core.checkpoints.hub.fetch_pipeline")
        for (repo_id, variant), (old_files, old_bytes, new_files, new_bytes) in rows.items():
            print(f"  {repo_id}, {variant}: {old_files} files {old_bytes:,} B ({old_bytes / 1e9:.2f} GB) -> "
                  f"{new_files} files {new_bytes:,} B ({new_bytes / 1e9:.2f} GB)")
    old_files, old_bytes, new_files, new_bytes = rows[SD15, None]
    assert (old_files, new_files) == (22, 12)
    assert new_bytes == 3438167540 + 334643276 + 492265874 + 524619 + 1059962 + 472 + 806 + 743 + 547 + 617 + 308 + \
        len(real_repo(SD15)["model_index.json"])
    assert round((old_bytes - new_bytes) / 1e9, 1) == 19.4  # the unused 19.4 GB of the issue
    assert rows[SDXL, "fp16"][3] < rows[SDXL, None][3] < rows[SDXL, None][1]
    assert set(fetched(hub)) == {"model_index.json"}  # planning reads model_index.json and nothing else


def test_not_enough_disk_space_is_an_error_before_any_weights_are_fetched(serve, monkeypatch, tmp_path):
    files = served_repo(SD15)
    hub = serve({SD15: files})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"needs [\d,]+ bytes .* only 1,000 bytes .* are free.*"
                                              r"Only model_index.json"):
        fetch_pipeline(SD15, progress=False)
    assert fetched(hub) == ["model_index.json"]  # read to know what to fetch; no config, no weights
    blobs = tmp_path / "hf" / "hub" / "models--runwayml--stable-diffusion-v1-5" / "blobs"
    assert len(list(blobs.iterdir())) == 1


def test_a_missing_repo_is_a_clear_error(serve):
    serve({SD15: real_repo(SD15)})
    with pytest.raises(CheckpointError, match=r"Could not fetch 'nobody/nothing'.*RepositoryNotFoundError.*"
                                              r"pass a local diffusers folder or a single .safetensors file"):
        fetch_pipeline("nobody/nothing", progress=False)


def test_a_gated_repo_is_a_clear_error_that_mentions_the_token(serve):
    serve({SD15: real_repo(SD15)}, gated=(SD15,))
    with pytest.raises(CheckpointError, match=r"Could not fetch .*for a gated repo, your token"):
        fetch_pipeline(SD15, progress=False)


def test_an_unreachable_hub_is_a_clear_error(serve):
    hub = serve({SD15: real_repo(SD15)})
    hub.__exit__(None, None, None)  # nothing listens at its address any more
    with pytest.raises(CheckpointError, match=r"Could not fetch .*ConnectError.*without a network, pass a local"):
        fetch_pipeline(SD15, progress=False)


def test_offline_mode_is_a_clear_error(serve, monkeypatch):
    hub = serve({SD15: real_repo(SD15)})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"Could not fetch .*without a network, pass a local"):
        fetch_pipeline(SD15, progress=False)
    assert hub.requests == []


@pytest.mark.parametrize("repo_id, family_width", [(CANNY_SD15, 32), (CANNY_SDXL, 64)])
def test_a_controlnet_repo_fetches_its_config_and_the_one_safetensors_file_it_loads(serve, repo_id, family_width):
    files = served_repo(repo_id)
    hub = serve({repo_id: files})
    controlnet = load_controlnet(repo_id)
    assert sorted(fetched(hub)) == ["config.json", "diffusion_pytorch_model.safetensors"]  # no .bin, fp16, images
    assert hub.bytes_served == len(files["config.json"]) + len(files["diffusion_pytorch_model.safetensors"])
    assert controlnet.config.cross_attention_dim == family_width
    assert_loaded_weights_are(controlnet, files, "diffusion_pytorch_model.safetensors")


def test_a_controlnet_repos_fp16_variant_fetches_only_the_fp16_safetensors(serve):
    files = served_repo(CANNY_SD15)
    hub = serve({CANNY_SD15: files})
    controlnet = load_controlnet(CANNY_SD15, variant="fp16")
    assert sorted(fetched(hub)) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert_loaded_weights_are(controlnet, files, "diffusion_pytorch_model.fp16.safetensors")
    hub.downloads.clear()
    load_controlnet(CANNY_SD15, variant="fp16")  # cached: nothing fetched again
    assert fetched(hub) == []


def test_a_controlnet_repo_without_the_variant_falls_back_to_its_plain_safetensors_with_a_warning(serve):
    repo = dict(served_repo(CANNY_SDXL))  # a copy without its fp16 safetensors
    del repo["diffusion_pytorch_model.fp16.safetensors"]
    hub = serve({CANNY_SDXL: repo})
    with pytest.warns(UserWarning, match=r"the repo/ has no 'fp16' weights; fetching diffusion_pytorch_model.safetensors"):
        load_controlnet(CANNY_SDXL, variant="fp16")
    assert sorted(fetched(hub)) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_a_controlnet_repo_with_only_pickled_weights_is_refused_before_any_weights_are_fetched(serve):
    repo = {k: v for k, v in served_repo(CANNY_SD15).items() if not k.endswith(".safetensors")}
    hub = serve({CANNY_SD15: repo})
    with pytest.raises(CheckpointError, match=r"has no safetensors weights .* sd_core fetches safetensors only; "
                                              r"convert the weights"):
        load_controlnet(CANNY_SD15)
    assert fetched(hub) == ["config.json"]


def test_a_pipeline_repo_is_not_taken_for_a_controlnet(serve):
    hub = serve({SD15: served_repo(SD15)})
    with pytest.raises(CheckpointError, match=r"no config.json at its root, so it is not a diffusers ControlNetModel "
                                              r"repo"):
        load_controlnet(SD15)
    assert fetched(hub) == []


def test_a_repo_of_another_single_model_is_not_taken_for_a_controlnet(serve):
    repo = dict(served_repo(CANNY_SD15), **{"config.json": json.dumps({"_class_name": "UNet2DConditionModel"}).encode()})
    hub = serve({CANNY_SD15: repo})
    with pytest.raises(CheckpointError, match=r"holds a UNet2DConditionModel, not a ControlNetModel"):
        load_controlnet(CANNY_SD15)
    assert fetched(hub) == ["config.json"]
