"""The house's boundaries are contracts (.importlinter), checked here so that a violating import fails CI."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.argv = ['lint-imports', '--no-cache']; lint_imports_command()"]


def lint(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, capture_output=True, text=True, timeout=120, cwd=folder)


def planted_copy(tmp_path: Path, relative: str, first_line: str) -> Path:
    """The code (no weights, docs or tests) with one line put at the top of one module."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "weights", "docs", "tests", "__pycache__",
                                                              ".import_linter_cache"))
    module = copy / relative
    module.write_text(first_line + "\n" + module.read_text())
    return copy


def test_every_contract_is_kept_by_the_code_as_it_is():
    result = lint(ROOT)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("module,planted,broken", [
    ("sd_core/models/unet.py", "from sd_core.checkpoints import loading",  # a model reading checkpoints: layers
     "sd_core.models.unet -> sd_core.checkpoints.loading"),
    ("sd_core/pipelines/generate.py", "import gradio", "sd_core.pipelines.generate -> gradio"),  # gradio outside app
    ("sd_core/checkpoints/saving.py", "import compare.kinds", "sd_core.checkpoints.saving -> compare.kinds"),
    ("sd_core/models/vae.py", "from PIL import Image", "sd_core.models.vae -> PIL"),  # a model reading images
])
def test_a_planted_violation_breaks_its_contract(tmp_path, module, planted, broken):
    result = lint(planted_copy(tmp_path, module, planted))
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout


def test_the_public_surface_names_what_readme_uses_and_imports_nothing_until_asked():
    code = ("import sys, sd_core\n"
            "before = sorted(m for m in sys.modules if m.startswith('sd_core.'))\n"
            "from sd_core import load_pipeline, text_to_image, image_to_image, inpaint, dit_sample, make_scheduler, "
            "make_fast, save_image, read_png_parameters\n"
            "print(before, all(callable(getattr(sd_core, n)) for n in sd_core.__all__ if not n.isupper()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.strip() == "[] True", result.stdout + result.stderr
