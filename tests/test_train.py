import dataclasses
import json

import diffusers
import numpy as np
import pytest
import torch

from sd_core.training import shapes_dataset as shapes

from sd_core.training import recipes as train
from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.generate import dit_sample, text_to_image
from tests.launch import launch

TINY_VAE = dict(train.VAE_CONFIG, block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4)
TINY_TEXT = dict(train.TEXT_ENCODER_CONFIG, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
TINY_UNET = dict(train.UNET_CONFIG, sample_size=32, block_out_channels=[16, 16], attention_head_dim=[2, 2],
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 cross_attention_dim=16, norm_num_groups=4)
TINY_DIT = dict(train.DIT_CONFIG, num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=32, patch_size=4)


def test_scorer_gives_full_marks_to_rendered_scenes():
    rng = np.random.default_rng(0)
    for scene in shapes.ALL_SCENES:
        for image in (shapes.render(scene), shapes.render(scene, rng)):
            result = shapes.score(image, scene)
            assert result.all and result.size, (scene, result.found)


@pytest.mark.parametrize("attribute", ["colour", "position", "shape", "size", "background"])
def test_scorer_catches_every_wrong_attribute(attribute):
    values = {"colour": list(shapes.COLOURS), "position": list(shapes.POSITIONS), "shape": list(shapes.SHAPES),
              "size": list(shapes.SIZES), "background": list(shapes.BACKGROUNDS)}[attribute]
    for scene in shapes.ALL_SCENES[::7]:
        wrong = dataclasses.replace(scene, **{attribute: next(v for v in values if v != getattr(scene, attribute))})
        result = shapes.score(shapes.render(wrong), scene)
        caught = not result.size if attribute == "size" else not result.all
        assert caught, (scene, wrong, result.found)


def test_scorer_rejects_noisy_backgrounds_and_empty_images():
    scene = shapes.ALL_SCENES[0]
    noisy = shapes.render(scene).astype(int) + np.random.default_rng(0).integers(-40, 40, (64, 64, 3))
    assert not shapes.score(np.clip(noisy, 0, 255).astype(np.uint8), scene).clean_background
    blank = np.full((64, 64, 3), shapes.BACKGROUNDS[scene.background], dtype=np.uint8)
    assert not shapes.score(blank, scene).all


def test_held_out_prompts_never_appear_in_training():
    assert shapes.HELD_OUT and not shapes.HELD_OUT & set(shapes.TRAIN_SCENES)
    seen = {scene for step in range(50) for scene, _ in shapes.sample_scenes(step, 16)}
    assert not seen & shapes.HELD_OUT


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train.train_vae(train.Run(out, steps=40, batch=8, lr=3e-3, save_every=20), TINY_VAE)
    return out


def losses(folder):
    return [float(line.split()[1]) for line in (folder / "loss.log").read_text().splitlines()]


@pytest.mark.slow
@torch.no_grad()
def test_vae_training_lowers_the_loss_and_writes_a_loadable_model(tiny_vae):
    assert len(losses(tiny_vae)) == 40
    _, images = train.batch_of_scenes(train.Run(tiny_vae, steps=1, batch=16, lr=0, seed=5), 0)  # unseen batch
    torch.manual_seed(0)
    initial = train.AutoencoderKL.from_config(TINY_VAE)  # the run's starting point (seed 0)
    vae = train.load_vae(tiny_vae / "model" / "vae")
    error = lambda model: torch.nn.functional.mse_loss(model.decode(model.encode(images).mode()), images)  # noqa: E731
    assert error(vae) < 0.85 * error(initial)
    assert vae.config.scaling_factor > 0
    reference = diffusers.AutoencoderKL.from_pretrained(tiny_vae / "model" / "vae", local_files_only=True)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vae.decode(vae.encode(x).mode()), reference(x).sample, atol=1e-5)


@pytest.mark.slow
def test_decoder_training_keeps_the_latent_space_and_lowers_the_error(tiny_vae, tmp_path):
    train.train_vae_decoder(train.Run(tmp_path, steps=30, batch=8, lr=3e-3, save_every=15), tiny_vae / "model")
    before, after = train.load_vae(tiny_vae / "model" / "vae"), train.load_vae(tmp_path / "model" / "vae")
    changed = {key for key, value in before.state_dict().items() if not torch.equal(value, after.state_dict()[key])}
    assert changed and all(key.startswith(("decoder.", "post_quant_conv.")) for key in changed), changed
    assert after.config.scaling_factor == before.config.scaling_factor
    _, images = train.batch_of_scenes(train.Run(tmp_path, steps=1, batch=16, lr=0, seed=5), 0)  # unseen batch
    with torch.no_grad():
        latents = before.encode(images).mode()
        error = lambda model: torch.nn.functional.mse_loss(model.decode(latents), images)  # noqa: E731
        assert error(after) < 0.9 * error(before)


@pytest.mark.slow
def test_training_resumes_exactly_from_its_checkpoint(tiny_vae, tmp_path):
    straight = train.Run(tmp_path / "straight", steps=6, batch=2, lr=1e-3, save_every=3)
    train.train_text_to_image(straight, tiny_vae / "model", TINY_TEXT, TINY_UNET)
    interrupted = dataclasses.replace(straight, out=tmp_path / "interrupted", stop_at=3)
    with pytest.raises(SystemExit, match="stopped at step 3 of 6"):
        train.train_text_to_image(interrupted, tiny_vae / "model", TINY_TEXT, TINY_UNET)
    train.train_text_to_image(dataclasses.replace(interrupted, stop_at=None), tiny_vae / "model", TINY_TEXT, TINY_UNET)
    a, b = load_pipeline(tmp_path / "straight" / "model"), load_pipeline(tmp_path / "interrupted" / "model")
    for name in ("unet", "text_encoder"):
        for key, value in a.models[name].state_dict().items():
            assert torch.equal(value, b.models[name].state_dict()[key]), key
    assert losses(tmp_path / "straight") == losses(tmp_path / "interrupted")


@pytest.mark.slow
def test_trained_folders_load_in_diffusers_and_give_the_same_images(tiny_vae, tmp_path):
    run = train.Run(tmp_path / "sd", steps=2, batch=2, lr=1e-3)
    train.train_text_to_image(run, tiny_vae / "model", TINY_TEXT, TINY_UNET)
    ours = load_pipeline(run.out / "model")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(run.out / "model", local_files_only=True)
    expected = theirs("a red circle", num_inference_steps=3, height=32, width=32,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    got = text_to_image(ours, "a red circle", steps=3, height=32, width=32, seed=0)
    assert np.abs(np.asarray(got.images[0]).astype(int) - (expected[0] * 255).round().astype(int)).max() <= 1
    run = train.Run(tmp_path / "dit", steps=2, batch=2, lr=1e-3)
    train.train_dit(run, tiny_vae / "model", TINY_DIT)
    ours = load_pipeline(run.out / "model")
    assert ours.id2label[0] == shapes.CLASS_NAMES[0]
    theirs = diffusers.DiTPipeline.from_pretrained(run.out / "model", local_files_only=True)
    expected = theirs([1], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    got = dit_sample(ours, ["green circle"], steps=3, seed=0)
    assert np.abs(np.asarray(got.images[0]).astype(int) - (expected[0] * 255).round().astype(int)).max() <= 1


# ------------------------------------------------------------------- several processes (accelerate, DDP)

# lr 0.1 so that 4 warm-up steps (lr_t = 0.001 .. 0.004) move each weight by up to 0.01: far above the tolerance.
PARALLEL = ["--steps", "4", "--batch", "4", "--lr", "0.1", "--save-every", "2"]


@pytest.fixture(scope="module")
def one_process(tiny_vae, tmp_path_factory):
    """The reference: one process, the whole batch of 4 in one forward/backward, in this process."""
    out = tmp_path_factory.mktemp("one_process")
    train.train_text_to_image(train.Run(out, steps=4, batch=4, lr=0.1, save_every=2), tiny_vae / "model",
                              TINY_TEXT, TINY_UNET)
    return out


def checkpoint(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=True)


@pytest.mark.slow
def test_two_processes_with_accumulation_train_as_one_process_with_the_whole_batch(tiny_vae, one_process, tmp_path):
    """2 processes x 2 accumulated micro-batches of 1 example = 1 process with the batch of 4, interrupted and
    resumed on the way. The runs differ only in float summation order (per-example vs batched kernels, the
    gloo all-reduce): ~1e-7 relative in the gradients, measured 5e-6 at most in the weights after Adam. The
    tolerance, 1e-4, is 1% of how far the 4 steps move the weights (asserted), so a wrong split (other
    examples, unsynced or unscaled gradients, a lost step) cannot pass."""
    command = ["tests.train_tiny", "text-to-image", "--vae", str(tiny_vae / "model"), "--out", str(tmp_path), *PARALLEL,
               "--gradient-accumulation-steps", "2"]
    stopped = launch(2, [*command, "--stop-at", "2"])  # the stop asked for is a success: exit status 0
    assert "stopped at step 2 of 4" in stopped.stderr
    assert checkpoint(tmp_path)["step"] == 2
    assert "resumed text-to-image at step 2" in launch(2, command).stdout
    assert json.loads((tmp_path / "time.json").read_text())["processes"] == 2
    reference, got = checkpoint(one_process), checkpoint(tmp_path)
    torch.manual_seed(0)  # the runs' initial weights
    initial = {"text_encoder": train.CLIPTextModel.from_config(TINY_TEXT).state_dict(),
               "unet": train.UNet2DConditionModel.from_config(TINY_UNET).state_dict()}
    for part in ("models", "ema"):
        for name, weights in reference[part].items():
            moved = max((value - initial[name][key]).abs().max().item() for key, value in weights.items())
            error = max((value - got[part][name][key]).abs().max().item() for key, value in weights.items())
            assert moved > 0.008 and error <= 1e-4, (part, name, moved, error)
    assert np.allclose(losses(tmp_path), losses(one_process), rtol=0, atol=1e-5)  # logged with 6 decimals
    assert len(losses(tmp_path)) == 4


@pytest.mark.slow
def test_gradient_accumulation_needs_a_batch_it_can_split(tiny_vae, tmp_path):
    run = train.Run(tmp_path, steps=1, batch=3, lr=0.1, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"batch \(3\) must split evenly into 1 process\(es\) x 2"):
        train.train_text_to_image(run, tiny_vae / "model", TINY_TEXT, TINY_UNET)


@pytest.mark.slow
def test_bf16_mixed_precision_trains_under_autocast(tiny_vae, one_process, tmp_path):
    """bf16 autocast on the CPU: the losses follow the fp32 run's to bf16's precision (8 bits of mantissa,
    ~0.4% per op; 2% over a whole forward pass) but are not equal to them, which shows autocast was on."""
    launch(1, ["tests.train_tiny", "text-to-image", "--vae", str(tiny_vae / "model"), "--out", str(tmp_path),
               "--steps", "2", "--batch", "4", "--lr", "0.1", "--mixed-precision", "bf16"])
    assert json.loads((tmp_path / "time.json").read_text())["mixed_precision"] == "bf16"
    bf16, fp32 = np.array(losses(tmp_path)), np.array(losses(one_process)[:2])
    assert np.all(np.abs(bf16 - fp32) <= 0.02 * fp32) and not np.array_equal(bf16, fp32), (bf16, fp32)
    assert (tmp_path / "model" / "unet").is_dir()


@pytest.mark.slow
def test_evaluation_split_over_two_processes_gives_the_one_process_scores(tmp_path):
    """Each process generates a share of the held-out prompts and DiT classes; the main process gathers them."""
    reports = {}
    for processes in (1, 2):
        out = tmp_path / f"report-{processes}.json"
        launch(processes, ["sd_core.training", "evaluate", "--model", "sd_core/weights/shapes-sd", "--dit",
                           "sd_core/weights/shapes-dit", "--seeds", "1", "--limit", "3", "--json", str(out)],
               timeout=300)
        reports[processes] = json.loads(out.read_text())
    assert reports[2]["processes"] == 2 and reports[1]["processes"] == 1
    for key in ("text_to_image", "images", "dit_class_accuracy", "vae_psnr_held_out_scenes"):
        assert reports[1][key] == reports[2][key], key
    assert reports[1]["images"] == 3
