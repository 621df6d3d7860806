"""The X/Y/Z plot's parity grid (sd_core.pipelines.lab.parity_grid): each cell through Compare's own comparison."""
import numpy as np
import pytest

from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.lab import xyz
from sd_core.pipelines.lab.parity_grid import comparison, parity_plot
from sd_core.pipelines.settings import DiTSettings, GenerationSettings

CAPTION = "a big red circle on the left on a gray background"


@pytest.fixture(scope="module")
def shapes():
    return load_pipeline("sd_core/weights/shapes-sd")


def same_pixels(a, b) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_parity_grid_verdict_equals_compares_for_the_same_settings(shapes):
    """The issue's proof: a parity-grid cell says what the Compare tab says for its settings."""
    from compare import kinds
    base = GenerationSettings(prompt=CAPTION, steps=2, scheduler="dpmpp_2m", seed=4, guidance_scale=5.0)
    plot = xyz.plan(base, ("CFG Scale", "1, 4"))
    cells = xyz.run_plot(plot, xyz.sd_runner(shapes)).cells
    parity = parity_plot(plot, kinds.run_comparison, shapes)
    compare = kinds.run_comparison("text_to_image", shapes, prompt=CAPTION, negative_prompt=None, seed=4, steps=2,
                                   scheduler="dpmpp_2m", guidance_scale=4.0)
    assert (parity.cells[1].passed, parity.cells[1].verdict) == (compare.passed, compare.verdict)
    assert parity.cells[1].max_difference == compare.stages[-1].max_abs
    assert all(same_pixels(cell.sd_core, image) for cell, image in zip(parity.cells, cells))  # the same pictures
    assert parity.passed and parity.cells[0].caption() == "✅ max |difference| 0"
    assert len(parity.grids) == 1 and parity.grids[0].width > 2 * 160


def test_parity_grid_refuses_settings_compare_does_not_take():
    with pytest.raises(ValueError, match="Compare's comparisons, which do not take clip_skip"):
        comparison(GenerationSettings(prompt=CAPTION, clip_skip=1, seed=1))
    assert comparison(DiTSettings(class_labels=("red circle",), seed=1, steps=2))[0] == "dit"
