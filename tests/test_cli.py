import json

import numpy as np
import pytest
from PIL import Image

from sd_core.__main__ import main
from tests import tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    sd = tiny.save_pretrained(tiny.stable_diffusion("sd1", seed=1), tmp_path_factory.mktemp("sd1"))
    dit = tiny.save_pretrained(tiny.dit(seed=2), tmp_path_factory.mktemp("dit"))
    return sd, dit


def test_generate_writes_images_with_metadata_and_prints_the_seed(folders, tmp_path, capsys):
    sd, _ = folders
    out = tmp_path / "cat.png"
    assert main(["generate", "--model", str(sd), "a cat", "--steps", "3", "--seed", "5", "--height", "16",
                 "--width", "24", "--batch", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seed 5" in printed
    for k, path in enumerate((tmp_path / "cat-0.png", tmp_path / "cat-1.png")):
        image = Image.open(path)
        assert image.size == (24, 16) and json.loads(image.text["sd_core"])["seed"] == 5 + k  # A1111's batch rule


def test_generate_is_reproducible_and_supports_image_to_image(folders, tmp_path):
    sd, _ = folders
    for name in ("a.png", "b.png"):
        main(["generate", "--model", str(sd), "a dog", "--steps", "2", "--seed", "9", "--height", "16", "--width",
              "16", "-o", str(tmp_path / name)])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert main(["generate", "--model", str(sd), "a dog", "--init-image", str(tmp_path / "a.png"), "--strength",
                 "0.5", "--steps", "4", "--seed", "1", "-o", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size == (16, 16)


def test_vae_and_dit_commands(folders, tmp_path, capsys):
    sd, dit = folders
    Image.new("RGB", (20, 12), (200, 30, 30)).save(tmp_path / "in.png")
    assert main(["vae", "--model", str(sd), str(tmp_path / "in.png"), "-o", str(tmp_path / "rec.png")]) == 0
    assert "PSNR" in capsys.readouterr().out and Image.open(tmp_path / "rec.png").size == (20, 12)
    assert main(["dit", "--model", str(dit), "class 2", "7", "--steps", "3", "--guidance", "1", "--seed", "0",
                 "-o", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d-0.png").is_file() and (tmp_path / "d-1.png").is_file()


def test_cli_errors_are_one_line_and_exit_2(folders, tmp_path, capsys):
    sd, dit = folders
    assert main(["generate", "--model", str(sd), "x", "-o", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(sd), "x", "--height", "99", "--steps", "1", "-o",
                 str(tmp_path / "x.png")]) == 2
    assert "height must be a positive multiple" in capsys.readouterr().err
    assert main(["dit", "--model", str(sd), "3", "-o", str(tmp_path / "x.png")]) == 2
    assert "needs a DiT model" in capsys.readouterr().err
    assert main(["dit", "--model", str(dit), "unicorn", "-o", str(tmp_path / "x.png")]) == 2
    assert "Unknown class label" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
