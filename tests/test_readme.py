"""README's "Command line" block runs as written and draws what its captions say (sd_core.training.shapes_dataset.score)."""
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_core.__main__ import main
from sd_core.training.shapes_dataset import BACKGROUNDS, COLOURS, POSITION_PHRASES, SHAPES, SIZES, Scene, score

README = Path(__file__).parent.parent / "README.md"


def command_lines() -> list[list[str]]:
    section = README.read_text().split("## Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line)[3:] for line in block.strip().splitlines()]  # past "python -m sd_core"


def scene_of(caption: str) -> Scene:
    """"a big red circle on the left on a gray background" -> its Scene (every attribute must be named)."""
    def find(names):
        (found,) = [name for name in names if re.search(rf"\b{re.escape(name)}\b", caption)]
        return found
    position = next(name for name, phrase in POSITION_PHRASES.items() if phrase in caption)
    return Scene(find(SHAPES), find(COLOURS), position, find(SIZES), find(BACKGROUNDS))


@pytest.mark.slow
def test_readme_command_lines_draw_what_they_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = command_lines()
    assert [argv[0] for argv in lines] == ["generate", "generate", "vae", "dit"]
    captions = {}
    for argv in lines:
        assert main(argv) == 0, argv
        output = argv[argv.index("-o") + 1]
        if argv[0] == "generate":
            captions[output] = argv[1]
            checks = [(output, scene_of(argv[1]), ("colour", "position", "shape", "size", "clean_background"))]
        elif argv[0] == "vae":  # the reconstruction still shows its input's caption
            checks = [(output, scene_of(captions[argv[1]]), ("colour", "position", "shape", "size"))]
        else:  # DiT classes name a colour and a shape only
            count = int(argv[argv.index("--count") + 1])
            colour, shape = argv[argv.index("--class") + 1].split()
            stem = Path(output)
            checks = [(str(stem.with_name(f"{stem.stem}-{k}{stem.suffix}")), Scene(shape, colour, "left", "big", "gray"),
                       ("colour", "shape")) for k in range(count)]
        for path, scene, fields in checks:
            result = score(np.asarray(Image.open(path).convert("RGB")), scene)
            assert all(getattr(result, field) for field in fields), (path, scene, result.found)
