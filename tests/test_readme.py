"""The documentation holds as written: README.md and docs/*.md name only files, links and Python names that exist;
every `python -m sd_core` line they print runs as printed and draws what its caption says
(sd_core.training.shapes_dataset.score); README's Python example runs; the Space's front matter names the curated
hub models."""
import fnmatch
import importlib
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_core.__main__ import main
from sd_core.checkpoints import catalog
from sd_core.training.shapes_dataset import BACKGROUNDS, COLOURS, POSITION_PHRASES, SHAPES, SIZES, Scene, score

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
COMMAND_LINE = ROOT / "docs" / "command-line.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
EMBEDDED_MODEL = "sd_core/weights/shapes-sd"
ALL_FIELDS = ("colour", "position", "shape", "size", "clean_background")


def section(page: Path, heading: str) -> str:
    """The text of `page` under the line `heading`, up to the next heading of the same level."""
    text = page.read_text().split(f"\n{heading}\n", 1)[1]
    level = heading.split(" ", 1)[0]
    return re.split(rf"\n{level} ", text, maxsplit=1)[0]


def code_block(page: Path, heading: str, language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", section(page, heading), re.S).group(1)


def command(line: str) -> list[str]:
    """A printed shell line as argv, its trailing comment dropped."""
    return shlex.split(line, comments=True)


def command_lines(heading: str) -> list[list[str]]:
    """The `python -m sd_core` lines of the command-line page's block under `heading`, past "python -m sd_core"."""
    return [command(line)[3:] for line in code_block(COMMAND_LINE, heading, "bash").strip().splitlines()]


def scene_of(caption: str) -> Scene:
    """"a big red circle on the left on a gray background" -> its Scene (every attribute must be named)."""
    def find(names):
        (found,) = [name for name in names if re.search(rf"\b{re.escape(name)}\b", caption)]
        return found
    position = next(name for name, phrase in POSITION_PHRASES.items() if phrase in caption)
    return Scene(find(SHAPES), find(COLOURS), position, find(SIZES), find(BACKGROUNDS))


def assert_draws(path, scene: Scene, fields=ALL_FIELDS):
    result = score(np.asarray(Image.open(path).convert("RGB")), scene)
    assert all(getattr(result, field) for field in fields), (path, scene, result.found)


@pytest.mark.slow
def test_command_line_page_lines_draw_what_they_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = command_lines("## Images from the embedded models")
    assert [argv[0] for argv in lines] == ["generate", "generate", "vae", "dit"]
    captions = {}
    for argv in lines:
        assert main(argv) == 0, argv
        output = argv[argv.index("-o") + 1]
        if argv[0] == "generate":
            captions[output] = argv[1]
            assert_draws(output, scene_of(argv[1]))
        elif argv[0] == "vae":  # the reconstruction still shows its input's caption
            assert_draws(output, scene_of(captions[argv[1]]), ("colour", "position", "shape", "size"))
        else:  # DiT classes name a colour and a shape only
            count = int(argv[argv.index("--count") + 1])
            colour, shape = argv[argv.index("--class") + 1].split()
            stem = Path(output)
            for k in range(count):
                assert_draws(stem.with_name(f"{stem.stem}-{k}{stem.suffix}"), Scene(shape, colour, "left", "big", "gray"),
                             ("colour", "shape"))


@pytest.mark.slow
def test_the_controlnet_line_draws_the_shape_where_the_control_image_has_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped ControlNet by its name, from any folder
    first, steered = command_lines("## ControlNet")
    assert main(first) == 0 and main(steered) == 0
    prompt, output = steered[1], steered[steered.index("-o") + 1]
    assert "in the center" in prompt
    assert_draws(output, scene_of(prompt.replace("in the center", "on the left")))  # where the control image's is
    plain = [argument for argument in steered if "shapes-controlnet" not in argument and argument != "--controlnet"]
    plain = plain[:plain.index("--preprocessor")] + plain[plain.index("--preprocessor") + 2:]
    plain[plain.index("-o") + 1] = "plain.png"
    assert main(plain) == 0
    assert_draws("plain.png", scene_of(prompt))  # the same seed without it: where the prompt says


@pytest.mark.slow
def test_prompt_file_line_writes_an_image_per_prompt_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (argv,) = command_lines("## Many images from a prompt file")
    prompts = ["a big red circle on the left on a gray background", "a big blue square on the right on a white background"]
    Path(argv[argv.index("--prompts") + 1]).write_text("\n".join(prompts) + "\n")
    assert main(argv) == 0, argv
    out = Path(argv[argv.index("--out") + 1])
    assert sorted(path.name for path in out.iterdir()) == ["00000-00.png", "00001-00.png"]
    for p, prompt in enumerate(prompts):
        assert_draws(out / f"{p:05d}-00.png", scene_of(prompt), ("colour", "shape"))


def test_every_sd_core_command_line_the_docs_print_is_one_these_tests_run():
    tested = [command_lines("## Images from the embedded models"), command_lines("## Many images from a prompt file"),
              command_lines("## ControlNet"), command_lines("## The Lab")]  # the Lab's: run by tests/test_cli_lab.py
    tested = {tuple(argv) for block in tested for argv in block}
    printed = {}
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                if line.startswith("python -m sd_core "):
                    printed[tuple(command(line)[3:])] = page.name
    assert printed and {argv: page for argv, page in printed.items() if argv not in tested} == {}


def test_the_dit_line_says_the_files_its_count_writes():
    from sd_core.__main__ import output_paths
    (line,) = [line for line in code_block(COMMAND_LINE, "## Images from the embedded models", "bash").splitlines()
               if "--count" in line]
    argv = command(line)
    written = output_paths(Path(argv[argv.index("-o") + 1]), int(argv[argv.index("--count") + 1]))
    assert line.split("# writes ", 1)[1].split(", ") == [str(written[0])] + [path.name for path in written[1:]]


def written_folders(argv: list[str]) -> set[str]:
    """The top folders a printed command writes into: --out's, -o's parent's, or compare's default report folder
    (compare-<kind>; parity-report; benchmark and startup write none)."""
    folders = {argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--out"}
    folders |= {str(Path(argv[i + 1]).parent) for i, word in enumerate(argv[:-1]) if word in ("-o", "--output")}
    compare_kind = argv[3] if argv[:3] == ["python", "-m", "compare"] and len(argv) > 3 else None
    if compare_kind not in (None, "benchmark", "startup") and "--out" not in argv:
        folders.add("parity-report" if compare_kind == "parity" else f"compare-{compare_kind}")
    return {Path(folder).parts[0] for folder in folders if folder not in ("", ".")}


def test_every_folder_the_docs_commands_write_is_git_ignored():
    ignored = [line.rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines() if line.endswith("/")]
    written = {folder for page in PAGES for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
               for line in block.replace("\\\n", " ").splitlines() for folder in written_folders(command(line))}
    assert "outputs" in written and {f for f in written if not any(fnmatch.fnmatch(f, p) for p in ignored)} == set()


def test_readme_python_example_draws_its_caption(tmp_path):
    code = code_block(README, "## Use it from Python", "python")
    assert f'load_pipeline("{EMBEDDED_MODEL}")' in code and '"circle.png"' in code
    code = code.replace(f'"{EMBEDDED_MODEL}"', repr(str(ROOT / EMBEDDED_MODEL)))
    code = code.replace('"circle.png"', repr(str(tmp_path / "circle.png")))
    exec(code, {})  # noqa: S102 (README's own example)
    assert_draws(tmp_path / "circle.png", scene_of("a big red circle on the left on a gray background"))


def test_ci_runs_the_readme_test_command():
    readme_lines = code_block(README, "## Two commands", "bash").strip().splitlines()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert command(readme_lines[-1]) == command(ci_lines[-1]) == ["python", "-m", "pytest"]


def test_readme_is_a_page_read_in_two_minutes():
    assert len(README.read_text().splitlines()) <= 200


def test_space_front_matter_lists_every_curated_hub_model():
    front_matter = README.read_text().split("---\n")[1]
    listed = re.search(r"^models:\n((?:- .*\n)+)", front_matter, re.M).group(1)
    assert [line[2:] for line in listed.splitlines()] == [model.source for model in catalog.HUB.values()]


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def broken_links(page: Path) -> list[str]:
    """Markdown link targets of `page` (relative to its folder) that are missing, or lack the #anchor they name."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    return broken


def defines(path: Path, dotted: str) -> bool:
    text = path.read_text()
    return all(re.search(rf"^\s*(def|class) {name}\b", text, re.M) for name in dotted.split("."))


def missing_paths(page: Path) -> list[str]:
    """`sd_core/...`, `compare/...`, `docs/...` and `tests/...` paths (relative to the repository) the page names
    that do not exist, and `file.py::name` references whose file does not define the name."""
    text = re.sub(r"\]\([^)]*\)", "]", page.read_text())  # link targets are checked by broken_links
    missing = []
    for path, name in re.findall(r"(?<![\w./-])((?:sd_core|compare|docs|tests)/[\w./-]*)(?:::([\w.]+))?", text):
        path = path.rstrip(".")
        if not (ROOT / path).exists() or (name and not defines(ROOT / path, name)):
            missing.append(f"{path}::{name}" if name else path)
    return missing


def resolves(dotted: str) -> bool:
    """`sd_core.training.batch`, `compare.kinds.KINDS`: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for name in parts[end:]:
            if not hasattr(value, name):
                return False
            value = getattr(value, name)
        return True
    return False


def test_every_path_and_link_the_docs_name_exists():
    problems = {page.name: missing_paths(page) + broken_links(page) for page in PAGES}
    assert {name: found for name, found in problems.items() if found} == {}


def python_names(text: str) -> set[str]:
    """`sd_core.training.batch`, and `sd_core.load_lora` for each name of `from sd_core import load_lora, ...`."""
    dotted = set(re.findall(r"(?<![\w./-])(?:sd_core|compare)(?:\.\w+)+", text))
    for module, names in re.findall(r"from ((?:sd_core|compare)[\w.]*) import ([\w, ]+)", text):
        dotted |= {f"{module}.{name.strip()}" for name in names.split(",") if name.strip()}
    return dotted


def test_every_sd_core_and_compare_name_the_docs_use_imports():
    names = {page.name: python_names(page.read_text()) for page in PAGES}
    unresolved = {page: sorted(n for n in found if not resolves(n)) for page, found in names.items()}
    assert {page: found for page, found in unresolved.items() if found} == {}
