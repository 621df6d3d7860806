"""The embedded ControlNet: its dataset (shapes anywhere, their drawn outlines), its training recipe, and the
shipped model (it puts the shape where the outline is; diffusers draws the same images with it)."""
import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sd_core.checkpoints.catalog import EMBEDDED_CONTROLNET, EMBEDDED_GUIDANCE, EMBEDDED_STEPS, EMBEDDED_TEXT_TO_IMAGE
from sd_core.checkpoints.controlnet import load_controlnet
from sd_core.checkpoints.loading import load_pipeline
from sd_core.models.controlnet import ControlNetModel
from sd_core.pipelines.generate import text_to_image
from sd_core.schedulers import make_scheduler
from sd_core.training import controlnet as recipe
from sd_core.training import shapes_dataset as shapes
from sd_core.training.loop import Run
from sd_core.training.__main__ import main as training_cli
from tests.helpers import assert_images_match


def placements(count: int, seed: int = 0) -> list[shapes.Placement]:
    rng = np.random.default_rng(seed)
    return [shapes.random_placement(rng) for _ in range(count)]


@pytest.mark.parametrize("width", [1, 2])
def test_an_outline_is_a_thin_white_line_on_black_that_fills_back_to_its_shape(width):
    for placement in placements(60, seed=width):
        drawn = shapes.outline(placement.mask, width)
        line = drawn.max(axis=-1) == 255
        assert set(np.unique(drawn)) == {0, 255} and (drawn[..., 0] == drawn[..., 2]).all()  # white on black
        assert (line & ~placement.mask).any() == (width == 2)  # width 2 adds the ring just outside
        edge_inside = placement.mask & shapes.touches(~placement.mask)
        edge_outside = ~placement.mask & shapes.touches(placement.mask)
        assert (line == (edge_inside | (edge_outside if width == 2 else False))).all()  # a line, not a fill
        assert (shapes.filled(drawn) == (placement.mask | line)).all()


def test_filled_leaves_an_open_stroke_unfilled():
    drawn = shapes.outline(shapes.shape_mask("square", 32, 32, 10))
    left = np.nonzero(drawn.max(axis=(0, 2)))[0].min()
    drawn[:, left] = 0  # erase the left side of the square's outline
    assert shapes.filled(drawn).sum() < 2 * (drawn.max(axis=-1) > 0).sum()


def test_placements_are_anywhere_the_shape_fits():
    found = placements(400)
    centres = np.array([(p.cx, p.cy) for p in found])
    assert centres.min() < 12 and centres.max() > 52  # left and right edges, top and bottom
    assert {p.position for p in found} == {"left", "center", "right"}
    assert {p.shape for p in found} == set(shapes.SHAPES) and {p.colour for p in found} == set(shapes.COLOURS)
    for p in found:
        assert shapes.SIZE_RANGE[0] <= p.half_width <= shapes.SIZE_RANGE[1]
        ys, xs = np.nonzero(p.mask)
        assert ys.min() >= 1 and xs.min() >= 1 and ys.max() <= 62 and xs.max() <= 62


def test_a_placement_caption_says_where_only_when_asked():
    p = shapes.Placement("circle", "blue", "gray", cx=50.0, cy=20.0, half_width=12.0)
    assert p.caption(size=False, position=False, background=False) == "a blue circle"
    assert p.caption(size=True, position=True, background=True) == "a big blue circle on the right on a gray background"
    assert shapes.Placement("square", "red", "white", 30.0, 30.0, 7.0).caption(True, True, False) == \
        "a small red square in the center"


def test_training_captions_name_colour_and_shape_and_vary_the_rest():
    examples = recipe.outline_examples(seed=3, count=200)
    for example in examples:
        assert f"{example.placement.colour} {example.placement.shape}" in example.caption
        assert (shapes.filled(example.outline) >= example.placement.mask).all()
    assert sum(" on the " in e.caption or " in the center" in e.caption for e in examples) < 100  # often unsaid
    assert len({e.caption for e in examples}) > 50


def test_a_scene_drawn_exactly_as_trained_scores_a_full_iou_on_every_held_out_outline():
    """The training scenes paint the shape out to its outline's outer edge, so the evaluation's target is reachable:
    painted from the shape's own mask instead, 2 px outlines of small shapes score under 0.8 however well drawn."""
    under = 0
    for index in range(100):
        case = recipe.evaluation_case(index)
        target = shapes.filled(case.outline)
        assert shapes.iou(recipe.generated_shape(case.image), target) == 1.0, index
        under += shapes.iou(case.placement.mask, target) < recipe.IOU_TARGET
    assert under == 13  # what the mask-painted scenes of the first shipped ControlNet could at best score


def test_evaluation_cases_are_drawn_from_seeds_training_never_uses():
    run = Run(out=None, steps=10 ** 6, batch=16, lr=1e-3, seed=99)  # any seed below 100, a million steps
    assert run.seed * 1_000_003 + run.steps < recipe.EVALUATION_SEED
    case = recipe.evaluation_case(0)
    assert case.caption == f"a {case.placement.colour} {case.placement.shape} on a {case.placement.background} background"


def test_training_timesteps_lean_to_the_noisy_end():
    scheduler = make_scheduler("ddpm", load_pipeline(EMBEDDED_TEXT_TO_IMAGE).scheduler_config)
    torch.manual_seed(0)
    t = recipe.early_leaning_timesteps(scheduler, 20000)
    assert t.min() >= 0 and t.max() == scheduler.config.num_train_timesteps - 1
    assert 0.77 < (t >= 500).float().mean() < 0.81  # 1 - 0.5 ** (1/3) of them


def test_the_controlnet_command_trains_from_the_unet_and_writes_a_diffusers_folder(tmp_path):
    training_cli(["controlnet", "--model", str(EMBEDDED_TEXT_TO_IMAGE), "--out", str(tmp_path / "run"), "--steps", "2",
                  "--batch", "2", "--threads", "1"])
    trained = load_controlnet(tmp_path / "run" / "model")
    unet = load_pipeline(EMBEDDED_TEXT_TO_IMAGE).unet
    start = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=recipe.HINT_WIDTHS)
    assert list(trained.config.conditioning_embedding_out_channels) == list(recipe.HINT_WIDTHS)
    assert trained.config.hint_downscale == 4  # 64 px outline -> 16x16 latents
    moved = [name for name, value in trained.state_dict().items() if not torch.equal(value, start.state_dict()[name])]
    assert any(name.startswith("controlnet_down_blocks") for name in moved)  # the zero convs learned
    assert diffusers.ControlNetModel.from_pretrained(tmp_path / "run" / "model", local_files_only=True) is not None


# ------------------------------------------------------------------------------------------- shipped


SHIPPED = EMBEDDED_CONTROLNET


def test_the_shipped_controlnet_is_small_and_in_diffusers_format():
    assert sorted(p.name for p in SHIPPED.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 10 * 2 ** 20
    reference = diffusers.ControlNetModel.from_pretrained(SHIPPED, local_files_only=True)
    ours = load_controlnet(SHIPPED)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_the_shipped_controlnet_draws_the_shape_where_the_outline_is():
    """A fast version of the evaluation (python -m sd_core.training evaluate-controlnet) on 6 held-out outlines at
    the app's defaults: the drawn shape overlaps its filled outline (IoU 0.88 on average when shipped), far more
    than the plain model's does from the same prompt and seed (0.12 on average): the ControlNet, not the prompt or
    the seed, places it. Case 2 is one of the shipped model's 9 misses in 100 (IoU 0.76)."""
    report = recipe.evaluate_controlnet(EMBEDDED_TEXT_TO_IMAGE, SHIPPED, cases=6)
    controlled = np.array([r["iou"] for r in report["results"]])
    pipe = load_pipeline(EMBEDDED_TEXT_TO_IMAGE)
    plain = np.array([shapes.iou(recipe.generated_shape(np.asarray(text_to_image(
        pipe, r["caption"], steps=EMBEDDED_STEPS, guidance_scale=EMBEDDED_GUIDANCE, seed=r["index"]).images[0])),
        shapes.filled(r["outline"])) for r in report["results"]])
    assert controlled.mean() >= 0.8 and plain.mean() <= 0.35, (controlled.round(2), plain.round(2))
    assert (controlled > plain + 0.3).sum() >= 5, (controlled.round(2), plain.round(2))


def test_diffusers_draws_the_same_image_with_the_shipped_controlnet():
    case = recipe.evaluation_case(3)
    outline = Image.fromarray(case.outline)
    theirs = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        EMBEDDED_TEXT_TO_IMAGE, controlnet=diffusers.ControlNetModel.from_pretrained(SHIPPED, local_files_only=True),
        local_files_only=True, safety_checker=None, requires_safety_checker=False)
    expected = theirs(case.caption, image=outline, num_inference_steps=EMBEDDED_STEPS, guidance_scale=EMBEDDED_GUIDANCE,
                      generator=torch.Generator().manual_seed(3), output_type="np").images
    ours = recipe.controlled_image(load_pipeline(EMBEDDED_TEXT_TO_IMAGE), load_controlnet(SHIPPED), case.caption,
                                   outline, seed=3)
    assert_images_match([ours], expected)
