import json
import os
import time

import diffusers
import pytest
import safetensors.torch
import torch

from sd_core.checkpoints.convert import CheckpointError
from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.checkpoints.families import FAMILIES as FAMILY_RECORDS, family_of_checkpoint
from sd_core.checkpoints.loading import load_pipeline
from sd_core.checkpoints.saving import export_single_file, save_pipeline
from tests import tiny
from tests.helpers import slow_unless

FAMILIES = ["sd1", "sd2", "sdxl", "dit"]


def reference_pipeline(family):
    return tiny.dit() if family == "dit" else tiny.stable_diffusion(family)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (diffusers pipeline, its save_pretrained folder)."""
    out = {}
    for family in FAMILIES:
        pipe = reference_pipeline(family)
        folder = tmp_path_factory.mktemp(family) / "diffusers"
        tiny.save_pretrained(pipe, folder)
        out[family] = (pipe, folder)
    return out


def assert_same_tensors(ours, reference_state_dicts):
    for name, expected in reference_state_dicts.items():
        got = ours.models[name].state_dict()
        assert got.keys() == expected.keys(), name
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}.{key}"


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_loads_with_every_tensor_equal(saved, family):
    reference, folder = saved[family]
    pipe = load_pipeline(folder)
    assert isinstance(pipe, DiTPipeline if family == "dit" else StableDiffusionPipeline)
    assert pipe.family == family
    assert_same_tensors(pipe, tiny.reference_state_dicts(reference))
    assert all(not model.training for model in pipe.models.values())
    if family == "dit":
        assert pipe.id2label[3] == "class 3"


@pytest.mark.parametrize("family", FAMILIES)
def test_original_single_file_round_trip_keeps_every_tensor(saved, family, tmp_path):
    reference, folder = saved[family]
    path = export_single_file(load_pipeline(folder), tmp_path / f"{family}.safetensors")
    assert family_of_checkpoint(safetensors.torch.load_file(path))[0].name == family
    pipe = load_pipeline(path, config=folder)
    assert pipe.family == family
    assert_same_tensors(pipe, tiny.reference_state_dicts(reference))


def test_single_file_keys_follow_the_original_layout(saved, tmp_path):
    path = export_single_file(load_pipeline(saved["sd1"][1]), tmp_path / "sd1.safetensors")
    keys = safetensors.torch.load_file(path).keys()
    for key in ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.1.1.conv.weight", "model.diffusion_model.out.2.bias",
                "first_stage_model.encoder.down.0.downsample.conv.weight", "first_stage_model.decoder.up.1.block.0.conv1.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"]:
        assert key in keys, key
    path = export_single_file(load_pipeline(saved["sdxl"][1]), tmp_path / "sdxl.safetensors")
    tensors = safetensors.torch.load_file(path)
    assert tensors["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert "model.diffusion_model.label_emb.0.0.weight" in tensors


def test_diffusers_from_single_file_agrees_offline(saved, tmp_path):
    """diffusers' own single-file loader, given the local config folder, reads our exported file the same way."""
    reference, folder = saved["sd1"]
    path = export_single_file(load_pipeline(folder), tmp_path / "sd1.safetensors")
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                                safety_checker=None)
    assert_same_tensors(load_pipeline(path, config=folder), tiny.reference_state_dicts(theirs))


@pytest.mark.parametrize("family", slow_unless(FAMILIES, ["sd1", "dit"]))
def test_saved_folder_loads_in_diffusers_unchanged(saved, family, tmp_path):
    reference, folder = saved[family]
    out = save_pipeline(load_pipeline(folder), tmp_path / "ours")
    theirs = diffusers.DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(theirs).__name__ == type(reference).__name__
    expected = tiny.reference_state_dicts(reference)
    for name, state in tiny.reference_state_dicts(theirs).items():
        assert all(torch.equal(state[k], expected[name][k]) for k in expected[name]), name


def test_dtype_and_variant_files(saved, tmp_path):
    _, folder = saved["sd1"]
    pipe = load_pipeline(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())
    variant = tmp_path / "variant"
    diffusers.StableDiffusionPipeline.from_pretrained(folder).save_pretrained(variant, variant="fp16")
    assert (variant / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert load_pipeline(variant, variant="fp16").unet.conv_in.weight.shape == (32, 4, 3, 3)
    with pytest.raises(CheckpointError, match="no weights file"):
        load_pipeline(variant)


def corrupt(path, tensors, name):
    safetensors.torch.save_file(tensors, path / name)
    return path / name


def test_key_accounting_names_missing_extra_and_misshapen_keys(saved, tmp_path):
    _, folder = saved["sd1"]
    tensors = safetensors.torch.load_file(export_single_file(load_pipeline(folder), tmp_path / "ok.safetensors"))
    missing = dict(tensors)
    del missing["model.diffusion_model.out.2.bias"]
    with pytest.raises(CheckpointError, match=r"lacks model\.diffusion_model\.out\.2\.bias"):
        load_pipeline(corrupt(tmp_path, missing, "missing.safetensors"), config=folder)
    extra = {**tensors, "model.diffusion_model.mystery.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"no part of the model uses: model\.diffusion_model\.mystery\.weight"):
        load_pipeline(corrupt(tmp_path, extra, "extra.safetensors"), config=folder)
    wrong = {**tensors, "model.diffusion_model.out.2.bias": torch.zeros(5)}
    with pytest.raises(CheckpointError, match=r"out\.2\.bias has shape \(5,\)"):
        load_pipeline(corrupt(tmp_path, wrong, "wrong.safetensors"), config=folder)
    # In a diffusers folder: a removed tensor is named too, with the count.
    broken = tmp_path / "broken"
    save_pipeline(load_pipeline(folder), broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    vae = safetensors.torch.load_file(weights)
    for key in list(vae)[:7]:
        del vae[key]
    safetensors.torch.save_file(vae, weights)
    with pytest.raises(CheckpointError, match=r"vae \(AutoencoderKL\) does not match its config: missing .*\(7 in all\)"):
        load_pipeline(broken)


def test_pickles_are_refused_unless_opted_in_and_then_weights_only(saved, tmp_path):
    reference, folder = saved["dit"]
    state = {"model": {k: v.clone() for k, v in safetensors.torch.load_file(
        export_single_file(load_pipeline(folder), tmp_path / "dit.safetensors")).items()}}
    torch.save(state, tmp_path / "DiT.pt")
    with pytest.raises(CheckpointError, match="pickle file.*allow_pickle=True"):
        load_pipeline(tmp_path / "DiT.pt")
    pipe = load_pipeline(tmp_path / "DiT.pt", allow_pickle=True, config=folder)
    assert_same_tensors(pipe, {"transformer": reference.transformer.state_dict()})

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="needs more than weights-only unpickling"):
        load_pipeline(tmp_path / "evil.ckpt", allow_pickle=True)


def test_dit_single_file_without_a_vae_says_how_to_supply_one(saved, tmp_path):
    _, folder = saved["dit"]
    path = export_single_file(load_pipeline(folder), tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="holds no VAE: pass vae="):
        load_pipeline(path)


def test_bad_files_each_get_one_clear_error(saved, tmp_path):
    _, folder = saved["sd1"]
    good = export_single_file(load_pipeline(folder), tmp_path / "good.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_pipeline(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_pipeline(tmp_path / "garbage.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_pipeline(tmp_path / "empty.safetensors")
    (tmp_path / "not_a_pipeline").mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_pipeline(tmp_path / "not_a_pipeline")
    safetensors.torch.save_file({"lora_unet_down.weight": torch.zeros(2)}, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="Unknown checkpoint family"):
        load_pipeline(tmp_path / "lora.safetensors")
    with pytest.raises(FileNotFoundError, match="neither a folder, a checkpoint file, nor a hub id"):
        load_pipeline(tmp_path / "nothing-here.safetensors")


def test_hub_id_offline_fails_at_once_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="pass a local diffusers folder"):
        load_pipeline("facebook/DiT-XL-2-256")
    assert time.monotonic() - start < 30


def test_ema_weights_on_request(saved, tmp_path):
    _, folder = saved["sd1"]
    tensors = safetensors.torch.load_file(export_single_file(load_pipeline(folder), tmp_path / "a.safetensors"))
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in tensors.items()
           if k.startswith("model.diffusion_model.")}
    path = corrupt(tmp_path, {**tensors, **ema}, "with_ema.safetensors")
    plain, averaged = load_pipeline(path, config=folder), load_pipeline(path, config=folder, use_ema=True)
    assert torch.equal(averaged.unet.conv_in.weight, plain.unet.conv_in.weight + 1)
    assert torch.equal(averaged.vae.encoder.conv_in.weight, plain.vae.encoder.conv_in.weight)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_pipeline(tmp_path / "a.safetensors", config=folder, use_ema=True)


def test_save_is_atomic_and_never_overwrites_silently(saved, tmp_path, monkeypatch):
    _, folder = saved["sd1"]
    pipe = load_pipeline(folder)
    target = save_pipeline(pipe, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pipeline(pipe, target)
    calls, real_save = [], safetensors.torch.save_file

    def disk_full_on_second_file(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_save(*args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_second_file)
    with pytest.raises(OSError, match="No space left"):
        save_pipeline(pipe, target, overwrite=True)
    monkeypatch.undo()
    assert json.loads((target / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert load_pipeline(target).unet.conv_in.weight.shape == (32, 4, 3, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_pipeline(load_pipeline(folder), tmp_path / "missing" / "out")


REAL_SIZE_KEYS = {  # well-known tensor names of the released original checkpoints
    "sd1": ["model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.input_blocks.11.0.in_layers.0.weight",
            "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
            "model.diffusion_model.output_blocks.8.2.conv.weight", "model.diffusion_model.middle_block.2.out_layers.3.weight",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
            "first_stage_model.decoder.mid.attn_1.proj_out.weight",
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"],
    "sd2": ["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight", "cond_stage_model.model.ln_final.bias",
            "cond_stage_model.model.positional_embedding", "model.diffusion_model.input_blocks.1.1.proj_in.weight"],
    "sdxl": ["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight",
             "model.diffusion_model.output_blocks.2.2.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
             "model.diffusion_model.label_emb.0.2.weight", "conditioner.embedders.1.model.text_projection",
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"],
    "sdxl_refiner": ["conditioner.embedders.0.model.text_projection", "model.diffusion_model.input_blocks.4.1.transformer_blocks.3.ff.net.2.weight"],
    "dit": ["x_embedder.proj.weight", "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight",
            "blocks.27.attn.qkv.weight", "blocks.27.adaLN_modulation.1.bias", "final_layer.linear.weight"],
}


@pytest.mark.parametrize("family", slow_unless(list(REAL_SIZE_KEYS), ["sd1", "sd2", "dit"]))
def test_real_size_rules_produce_the_original_names_and_invert_exactly(family):
    from sd_core.checkpoints import convert
    from sd_core.models.dit import dit_config
    from sd_core.checkpoints.loading import expected_shapes, single_file_layout
    tensors = {}
    configs = {"transformer": dit_config("DiT-XL/2")} if family == "dit" else {}
    layout = single_file_layout(FAMILY_RECORDS[family], {}, configs)
    models = {}
    for name, (model_class, config, rules) in layout.items():
        with torch.device("meta"):
            models[name] = model_class.from_config(config)
        tensors.update(convert.export_component(models[name].state_dict(), rules))
    assert set(REAL_SIZE_KEYS[family]) <= set(tensors)
    assert family_of_checkpoint(tensors)[0].name == family
    for name, (model_class, config, rules) in layout.items():
        converted, _ = convert.convert_component(tensors, rules, expected_shapes(model_class, config), name)
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected_shapes(model_class, config)


def test_models_are_built_as_shapes_without_running_initializers_that_cost_the_app_its_start():
    """Weights are assigned after building on meta, so initializers are skipped there (torch's meta normal_
    imports sympy: 0.9 s of the app's start); tensors on a real device are still initialized."""
    import subprocess
    import sys
    from sd_core.checkpoints.loading import on_meta
    with on_meta():
        embedding = torch.nn.Embedding(8, 4)
        real = torch.zeros(3, device="cpu").normal_()
    assert embedding.weight.is_meta and real.abs().sum() > 0
    loads = ("import sys; from sd_core.checkpoints.catalog import EMBEDDED; from sd_core.checkpoints.loading import load_pipeline; "
             "[load_pipeline(entry.source) for entry in EMBEDDED.values()]; print('sympy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", loads], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.stdout.strip() == "False"
