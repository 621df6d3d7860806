"""sd_core.files: everything written whole or not at all, with an ordinary file's mode."""
import os

import pytest
from PIL import Image

from sd_core.files import CannotWrite, atomic_path
from sd_core.pipelines.image_io import save_image


def test_a_written_image_gets_the_mode_the_umask_gives_an_ordinary_file(tmp_path):
    """mkstemp makes private files (0600); a result is an ordinary file (0644 under umask 022, 0640 under 027)."""
    old = os.umask(0o022)
    try:
        path = save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        path = save_image(Image.new("RGB", (8, 8)), tmp_path / "b.png")
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "kept.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.bin"]


def test_an_unwritable_folder_is_one_clear_error(tmp_path):
    with pytest.raises(CannotWrite, match="Cannot write .*missing.*Choose another output path"):
        with atomic_path(tmp_path / "missing" / "x.bin") as temporary:
            temporary.write_bytes(b"x")
