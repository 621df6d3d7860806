"""The Lab's commands: python -m sd_core xyz and python -m sd_core attention (sd_core/lab_cli.py)."""
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_core.__main__ import main
from sd_core.pipelines.lab import xyz
from sd_core.pipelines.metadata import read_png_parameters
from tests import tiny

COMMAND_LINE = Path(__file__).resolve().parents[1] / "docs" / "command-line.md"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two different tiny SD 1.x models (the Model axis) and a tiny DiT."""
    return [tiny.save_pretrained(model, tmp_path_factory.mktemp(name)) for name, model in
            (("a", tiny.stable_diffusion("sd1", seed=1)), ("b", tiny.stable_diffusion("sd1", seed=2)),
             ("dit", tiny.dit(seed=2)))]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_xyz_writes_a_grid_per_z_value_and_every_cell_each_with_its_settings(folders, tmp_path, capsys):
    a, b, _ = folders
    out = tmp_path / "grid.png"
    assert main(["xyz", "a cat", "--model", str(a), "--x-type", "Seed", "--x-values", "1-2", "--y-type", "Model",
                 "--y-values", f"{a}, {b}", "--z-type", "Steps", "--z-values", "1, 2", "--height", "16", "--width",
                 "16", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cell 8/8" in printed and f"loading {b}" in printed and f"loading {a}" not in printed  # each model once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid-cell-000.png", "grid-cell-001.png",
                                                          "grid-cell-002.png", "grid-cell-003.png",
                                                          "grid-cell-004.png", "grid-cell-005.png",
                                                          "grid-cell-006.png", "grid-cell-007.png",
                                                          "grid-z0.png", "grid-z1.png"]
    read = xyz.grid_settings(Image.open(tmp_path / "grid-z1.png"))
    assert [(c["seed"], c["steps"]) for c in read["cells"]] == [(1, 2), (2, 2), (1, 2), (2, 2)]
    assert read_png_parameters(tmp_path / "grid-cell-006.png").seed == 1
    # the cell of model b, seed 1, 2 steps is the picture `generate` draws alone with those settings
    assert main(["generate", "a cat", "--model", str(b), "--seed", "1", "--steps", "2", "--height", "16", "--width",
                 "16", "-o", str(tmp_path / "alone.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "grid-cell-006.png"), pixels(tmp_path / "alone.png"))
    assert not np.array_equal(pixels(tmp_path / "grid-cell-004.png"), pixels(tmp_path / "alone.png"))


def test_xyz_on_a_dit_model_varies_its_class(folders, tmp_path):
    *_, dit = folders
    assert main(["xyz", "--model", str(dit), "--class", "3", "--x-type", "Class label", "--x-values", "3, 7",
                 "--steps", "2", "-o", str(tmp_path / "dit.png")]) == 0
    cells = [json.loads(Image.open(tmp_path / f"dit-cell-00{i}.png").text["sd_core"]) for i in range(2)]
    assert [cell["class_labels"] for cell in cells] == [[3], [7]]


def test_attention_writes_the_picture_each_words_map_and_their_strip(folders, tmp_path, capsys):
    a, *_ = folders
    assert main(["attention", "a red cat on a mat", "--model", str(a), "--steps", "2", "--seed", "3", "--height",
                 "16", "--width", "16", "-o", str(tmp_path / "maps.png")]) == 0
    assert "a, red, cat, on, a, mat" in capsys.readouterr().out
    words = sorted(p.name for p in tmp_path.glob("maps-word-*.png"))
    assert words == ["maps-word-00-a.png", "maps-word-01-red.png", "maps-word-02-cat.png", "maps-word-03-on.png",
                     "maps-word-04-a.png", "maps-word-05-mat.png"]
    assert read_png_parameters(tmp_path / "maps.png").seed == 3
    assert Image.open(tmp_path / "maps-words.png").width >= 6 * 160
    assert not np.array_equal(pixels(tmp_path / words[0]), pixels(tmp_path / words[4]))  # each "a" its own map


@pytest.mark.parametrize("argv,message", [
    (["xyz", "a cat", "--x-type", "Seed", "--x-values", "1-1e9"], "seed must be a whole number from 0 to 4294967295"),
    (["xyz", "a cat", "--x-type", "Seed", "--x-values", "1-1000000"], "makes 1000000 values; a plot holds at most"),
    (["xyz", "a cat", "--x-type", "Sampler", "--x-values", "Euler, Karras 9000"], "Unknown sampler 'Karras 9000'"),
    (["xyz", "a cat", "--x-type", "Prompt S/R", "--x-values", "dog, cow"], "Prompt S/R did not find 'dog'"),
    (["xyz", "--class", "3"], "A Stable Diffusion model draws a prompt"),
])
def test_lab_command_errors_are_one_line_with_the_bound_and_exit_2(folders, tmp_path, capsys, argv, message):
    assert main(argv + ["--model", str(folders[0]), "--steps", "1", "-o", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def lab_lines() -> list[list[str]]:
    """The `python -m sd_core` lines of command-line.md's "## The Lab" block, past "python -m sd_core"."""
    block = COMMAND_LINE.read_text().split("\n## The Lab\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True)[3:] for line in block.strip().splitlines()]


@pytest.mark.slow
def test_command_line_page_lab_lines_run_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = lab_lines()
    assert [argv[0] for argv in lines] == ["xyz", "attention"]
    for argv in lines:
        assert main(argv) == 0, argv
    grid = xyz.grid_settings(Image.open("outputs/grid.png"))
    assert [(c["seed"], c["guidance_scale"]) for c in grid["cells"]] == [(s, g) for g in (1, 4, 7) for s in (1, 2, 3)]
    assert Path("outputs/maps-word-03-circle.png").is_file() and Path("outputs/maps-words.png").is_file()
