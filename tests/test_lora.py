"""LoRA merged by sd_core equals diffusers' load_lora_weights + fuse_lora, in both file formats."""
import re

import diffusers
import peft
import pytest
import safetensors.torch
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from sd_core.checkpoints import convert
from sd_core.checkpoints.convert import CheckpointError
from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.lora import apply_loras, load_lora, loras_applied, remove_loras
from sd_core.pipelines.generate import text_to_image
from tests import tiny
from tests.helpers import assert_images_match, relative_diff, slow_unless

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TEXT_ENCODERS = {"sd1": {"text_encoder": "lora_te_"},  # component -> kohya prefix
                 "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}
PROMPT = "a small red circle on the left"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a saved tiny diffusers pipeline folder."""
    out = {}
    for family in ("sd1", "sdxl"):
        out[family] = tiny.save_pretrained(tiny.stable_diffusion(family, seed=3), tmp_path_factory.mktemp(family))
    return out


def adapted_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name.endswith(tuple("." + t for t in targets))]


def random_pair(module: nn.Module, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up): kxk down and 1x1 up for a conv (LoCon), scaled so the update is as large as the weight."""
    w = module.weight
    down_shape = (rank, *w.shape[1:])
    up_shape = (w.shape[0], rank, *([1, 1] if w.ndim == 4 else []))
    down = torch.randn(down_shape, generator=generator) / w[0].numel() ** 0.5
    return down, torch.randn(up_shape, generator=generator) / rank ** 0.5


def kohya_state_dict(reference, family: str, seed: int, alpha: float = 3.0) -> dict:
    """A kohya file for every attention, feed-forward, projection and resnet layer (3x3 and 1x1 convs too), ranks
    2 to 4, one alpha for all as kohya's trainer writes it (diffusers applies a file's most common alpha to
    attention layers and to layers without one; kohya's own loader uses each layer's, see the test below). SDXL's
    UNet keys use the original LDM names, as kohya writes them; diffusers maps those itself, so it judges
    sd_core's mapping."""
    generator = torch.Generator().manual_seed(seed)
    ldm = convert.unet_rules(reference.unet.config) if family == "sdxl" else None
    named = []
    for name, module in adapted_layers(reference.unet, UNET_TARGETS):
        if ldm is not None:
            name = ldm.source(f"{name}.weight").keys[0].removeprefix(ldm.prefix).removesuffix(".weight")
        named.append(("lora_unet_" + name.replace(".", "_"), module))
    for component, prefix in TEXT_ENCODERS[family].items():
        for name, module in adapted_layers(getattr(reference, component), TEXT_TARGETS):
            name = name if name.startswith("text_model.") else "text_model." + name  # files keep transformers 4's
            named.append((prefix + name.replace(".", "_"), module))
    tensors = {}
    for i, (stem, module) in enumerate(named):
        rank = 2 + i % 3
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = random_pair(module, rank, generator)
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    return tensors


def peft_file(family: str, folder, seed: int) -> str:
    """A diffusers-format file written by diffusers' own save_lora_weights from PEFT adapters (random, not zero-
    initialised), with LoraConfig metadata whose lora_alpha differs from r and an alpha_pattern."""
    pipe = tiny.stable_diffusion(family, seed=3)
    layers, metadata = {}, {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for component in ("unet", *TEXT_ENCODERS[family]):
            config = peft.LoraConfig(r=4, lora_alpha=8 if component == "unet" else 2, init_lora_weights=False,
                                     target_modules=UNET_TARGETS if component == "unet" else TEXT_TARGETS,
                                     alpha_pattern={"attn2.to_k": 16} if component == "unet" else {})
            model = getattr(pipe, component)
            model.add_adapter(config)
            layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
            metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(folder, **layers, **metadata)
    return str(folder / "pytorch_lora_weights.safetensors")


def processor_state_dict(reference, seed: int) -> dict:
    """diffusers' older attention-processor format: `attn1.processor.to_q_lora.down.weight` (UNet) and
    `self_attn.to_q_lora.down.weight`, `mlp.fc1.lora_linear_layer.down.weight` (text encoder); no alphas."""
    generator = torch.Generator().manual_seed(seed)
    renames = {"to_q": "processor.to_q_lora", "to_k": "processor.to_k_lora", "to_v": "processor.to_v_lora",
               "to_out.0": "processor.to_out_lora", "q_proj": "to_q_lora", "k_proj": "to_k_lora",
               "v_proj": "to_v_lora", "out_proj": "to_out_lora", "fc1": "fc1.lora_linear_layer",
               "fc2": "fc2.lora_linear_layer"}
    tensors = {}
    for component, targets in (("unet", ["to_q", "to_k", "to_v", "to_out.0"]), ("text_encoder", TEXT_TARGETS)):
        for name, module in adapted_layers(getattr(reference, component), targets):
            target = next(t for t in targets if name.endswith("." + t))
            stem = f"{component}.{name.removesuffix(target)}{renames[target]}"
            tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = random_pair(module, 3, generator)
    return tensors


def write_kohya(family: str, folder, seed: int) -> str:
    path = folder / f"kohya_{family}_{seed}.safetensors"
    safetensors.torch.save_file(kohya_state_dict(tiny.stable_diffusion(family, seed=3), family, seed), path)
    return str(path)


def fused_reference(family: str, folder, files: list[str], scales: list[float]):
    """diffusers' pipeline from `folder` with the LoRAs fused at their scales, LoRA layers unloaded."""
    pipeline_class = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    reference = pipeline_class.from_pretrained(folder)
    if len(files) == 1:
        reference.load_lora_weights(files[0])
        reference.fuse_lora(lora_scale=scales[0])
    else:
        names = [f"lora{i}" for i in range(len(files))]
        for name, file in zip(names, files):
            reference.load_lora_weights(file, adapter_name=name)
        reference.set_adapters(names, scales)
        reference.fuse_lora()
    reference.unload_lora_weights()
    return reference


@torch.no_grad()
def assert_models_match(ours, reference, family: str):
    """Merged weights, text-encoder and UNet outputs within 1e-6 of diffusers', and the same 8-bit images."""
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    for component in TEXT_ENCODERS[family]:
        expected = getattr(reference, component)(ids, output_hidden_states=True).hidden_states[-2]
        assert relative_diff(ours.models[component](ids, output_hidden_states=True).hidden_states[-2], expected) <= 1e-6
    for component in ("unet", *TEXT_ENCODERS[family]):
        expected = getattr(reference, component).state_dict()
        for name, tensor in ours.models[component].state_dict().items():
            assert relative_diff(tensor, expected[name]) <= 1e-6, (component, name)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, reference.unet.config.cross_attention_dim, generator=generator)
    added = {"text_embeds": torch.randn(2, 32, generator=generator), "time_ids": torch.randn(2, 6, generator=generator)}
    kwargs = {"added_cond_kwargs": added} if family == "sdxl" else {}
    expected = reference.unet(sample, 500, context, **kwargs).sample
    assert relative_diff(ours.unet(sample, torch.tensor(500), context, **kwargs), expected) <= 1e-6
    result = text_to_image(ours, PROMPT, steps=4, guidance_scale=5.0, height=24, width=32, scheduler="ddim", seed=7)
    images = reference(PROMPT, num_inference_steps=4, guidance_scale=5.0, height=24, width=32,
                       generator=torch.Generator().manual_seed(7), output_type="np").images
    assert_images_match(result.images, images)


def snapshot(pipe) -> dict:
    return {f"{c}.{k}": v.clone() for c, m in pipe.models.items() for k, v in m.state_dict().items()}


def assert_restored(pipe, before: dict):
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(after[k], before[k])] == []


@pytest.mark.parametrize("fmt,family", slow_unless([("kohya", "sd1"), ("kohya", "sdxl"), ("peft", "sd1"), ("peft", "sdxl")],
                                                  [("kohya", "sd1"), ("peft", "sdxl")]))
def test_merged_lora_equals_diffusers_fuse_lora_and_unloads_exactly(folders, tmp_path, family, fmt):
    file = write_kohya(family, tmp_path, seed=1) if fmt == "kohya" else peft_file(family, tmp_path, seed=1)
    ours = load_pipeline(folders[family])
    before = snapshot(ours)
    lora = load_lora(file)
    applied = apply_loras(ours.models, [(lora, 0.7)])
    assert len(applied.originals) == len(lora.layers) > 50
    assert_models_match(ours, fused_reference(family, folders[family], [file], [0.7]), family)
    remove_loras(applied)
    assert_restored(ours, before)


def test_two_loras_of_both_formats_at_different_scales_equal_diffusers_set_adapters(folders, tmp_path):
    files = [write_kohya("sd1", tmp_path, seed=2), peft_file("sd1", tmp_path, seed=3)]
    ours = load_pipeline(folders["sd1"])
    before = snapshot(ours)
    with loras_applied(ours.models, [(load_lora(files[0]), 0.6), (load_lora(files[1]), -0.4)]):
        assert_models_match(ours, fused_reference("sd1", folders["sd1"], files, [0.6, -0.4]), "sd1")
    assert_restored(ours, before)


def test_older_diffusers_attention_processor_format_equals_diffusers(folders):
    state_dict = processor_state_dict(tiny.stable_diffusion("sd1", seed=3), seed=4)
    ours = load_pipeline(folders["sd1"])
    apply_loras(ours.models, [(load_lora(state_dict), 0.9)])
    assert_models_match(ours, fused_reference("sd1", folders["sd1"], [dict(state_dict)], [0.9]), "sd1")


@torch.no_grad()
def test_kohya_alpha_is_per_layer_and_defaults_to_the_rank_as_kohya_loads_it(folders):
    """sd-scripts scales each layer by its own alpha / rank, alpha = rank where a file has none. (diffusers instead
    gives attention layers and alpha-less layers the file's most common alpha: the original wins, DESIGN.md.)"""
    ours = load_pipeline(folders["sd1"])
    base = {name: m.weight.clone() for name, m in ours.unet.named_modules() if hasattr(m, "weight")}
    generator = torch.Generator().manual_seed(5)
    layers = {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 5.0,
              "down_blocks.1.resnets.0.conv1": None, "down_blocks.1.resnets.0.conv_shortcut": 0.5}
    tensors, expected = {}, {}
    for name, alpha in layers.items():
        weight = base[name]
        down, up = random_pair(ours.unet.get_submodule(name), 2, generator)
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        # a conv's kxk down applied after its 1x1 up is one kxk conv: out x (in, k, k) = up @ down.flatten(1)
        update = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) if weight.ndim == 4 else up @ down
        expected[name] = weight + 0.8 * ((alpha or 2) / 2) * update
    apply_loras(ours.models, [(load_lora(tensors), 0.8)])
    for name, weight in expected.items():
        assert relative_diff(ours.unet.get_submodule(name).weight, weight) <= 1e-6, name


def kohya_pair(stem: str, shape=(4, 32)) -> dict:
    return {f"{stem}.lora_down.weight": torch.ones(2, shape[1]), f"{stem}.lora_up.weight": torch.ones(shape[0], 2)}


@pytest.mark.parametrize("tensors,named", [
    (kohya_pair("lora_unet_down_blocks_7_attentions_0_proj_in"), "lora_unet_down_blocks_7_attentions_0_proj_in"),
    (kohya_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1"), "the pipeline has no text_encoder_2"),
    (kohya_pair("lora_unet_conv_in", (32, 4)), "lora_unet_conv_in (up (32, 2) @ down (2, 4) does not fit"),
])
def test_a_layer_that_does_not_fit_the_model_is_an_error_naming_it_and_changes_nothing(folders, tensors, named):
    ours = load_pipeline(folders["sd1"])
    before = snapshot(ours)
    good = kohya_pair("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", (64, 64))
    with pytest.raises(CheckpointError, match=re.escape(named)):
        apply_loras(ours.models, [(load_lora(good), 1.0), (load_lora(tensors), 1.0)])
    assert_restored(ours, before)


@pytest.mark.parametrize("tensors,named", [
    ({**kohya_pair("lora_unet_conv_in"), "lora_unet_conv_in.dora_scale": torch.ones(1)},
     "lora_unet_conv_in.dora_scale"),
    ({**kohya_pair("lora_unet_conv_in"), "lora_unet_conv_out.lora_up.weight": torch.ones(4, 2)},
     "lora_unet_conv_out.down (the other half"),
    ({"unet.conv_in.lora_A.weight": torch.ones(2, 4), "vae.decoder.conv_in.lora_A.weight": torch.ones(2, 4)},
     "vae.decoder.conv_in.lora_A.weight"),
])
def test_a_key_of_no_known_lora_format_is_an_error_naming_it(tensors, named):
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_lora(tensors)


def test_pickles_are_refused_unless_allowed_and_then_read_weights_only(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save(kohya_pair("lora_unet_conv_in"), path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_lora(path)
    assert list(load_lora(path, allow_pickle=True).layers) == ["lora_unet_conv_in"]
