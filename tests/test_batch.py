import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from sd_core.training import batch
from tests.launch import ROOT, launch

PROMPTS = ["a big red circle on the left on a gray background",
           json.dumps({"prompt": "a small blue square", "images": 2, "seed": 41, "guidance_scale": 3.0}),
           "",  # blank lines take no index
           json.dumps({"prompt": "a green triangle", "negative_prompt": "red", "steps": 2, "scheduler": "euler"}),
           "a yellow star on the right"]
NAMES = ["00000-00.png", "00001-00.png", "00001-01.png", "00002-00.png", "00003-00.png"]
FLAGS = ["--steps", "3", "--seed", "7", "--threads", "1"]


def arguments(**overrides):
    parser = argparse.ArgumentParser()
    batch.add_arguments(parser)
    args = parser.parse_args(["--prompts", "p", "--out", "o"])
    return argparse.Namespace(**{**vars(args), **overrides})


def test_every_image_gets_its_own_documented_seed(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    jobs = batch.plan(batch.read_prompts(tmp_path / "p.txt"), dict(steps=3, guidance_scale=5.0), 7, 1)
    assert [job.name for job in jobs] == NAMES
    assert [job.settings.seed for job in jobs] == [7 * 1_000_003, 41, 42, 7 * 1_000_003 + 2 * 1_009,
                                                   7 * 1_000_003 + 3 * 1_009]
    assert len({job.settings.seed for job in jobs}) == len(jobs)
    assert jobs[1].settings.guidance_scale == 3.0 and jobs[0].settings.guidance_scale == 5.0
    assert (jobs[3].settings.steps, jobs[3].settings.scheduler, jobs[3].settings.negative_prompt) == (2, "euler", "red")
    assert batch.image_seed(2 ** 31, 5, 3) == (2 ** 31 * 1_000_003 + 5 * 1_009 + 3) % 2 ** 32


def test_settings_the_command_line_leaves_out_are_the_models_recommended_ones():
    """`python -m sd_core generate --prompts FILE --out DIR` with no --steps: the model's steps, not None."""
    from sd_core.checkpoints.catalog import EMBEDDED_STEPS
    defaults = batch.command_line_settings(arguments(steps=None), pipe=None, embedded=True)
    jobs = batch.plan([{"prompt": "a red circle"}], defaults, 0, 1)
    assert jobs[0].settings.steps == EMBEDDED_STEPS and jobs[0].settings.scheduler == "dpmpp_2m"


def test_prompt_file_errors_name_the_line(tmp_path):
    (tmp_path / "p.txt").write_text('a cat\n{"prompt": "x", "guidance": 3}\n')
    with pytest.raises(ValueError, match="prompt 1: Unknown setting guidance; the settings are"):
        batch.plan(batch.read_prompts(tmp_path / "p.txt"), {}, 0, 1)
    (tmp_path / "p.txt").write_text('{"steps": 3}\n')
    with pytest.raises(ValueError, match="line 1: needs a string"):
        batch.read_prompts(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text('{"prompt": "x",\n')
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        batch.read_prompts(tmp_path / "p.txt")
    with pytest.raises(ValueError, match="--prompts needs --out"):
        batch.run(arguments(prompts=tmp_path / "p.txt", out=None))
    with pytest.raises(ValueError, match=r"prompt 0: a prompt file runs the parity path; remove \"fast\""):
        batch.plan([{"prompt": "x", "fast": True, "tgate": 0.5}], {}, 0, 1)  # it would be tagged fast, made plain


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: every image made on one process (embedded model, 3 steps)."""
    folder = tmp_path_factory.mktemp("batch")
    (folder / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    printed = launch(1, ["sd_core.training.batch", "--prompts", str(folder / "p.txt"), "--out", str(folder / "one"), *FLAGS])
    assert "5 images in" in printed.stdout and "1 process)" in printed.stdout
    assert sorted(p.name for p in (folder / "one").iterdir()) == NAMES
    return folder


@pytest.mark.slow
def test_two_processes_write_the_same_bytes_as_one(one_process):
    printed = launch(2, ["sd_core.training.batch", "--prompts", str(one_process / "p.txt"), "--out", str(one_process / "two"),
                         *FLAGS])
    assert "5 images in" in printed.stdout and "2 processes" in printed.stdout
    assert sorted(p.name for p in (one_process / "two").iterdir()) == NAMES  # no .partial files left
    for name in NAMES:
        assert (one_process / "two" / name).read_bytes() == (one_process / "one" / name).read_bytes(), name
    a, b = ((one_process / "one" / name).read_bytes() for name in NAMES[1:3])
    assert a != b  # images of one prompt differ (their own seeds)


@pytest.mark.slow
def test_an_interrupted_run_resumes_without_redoing_finished_images(one_process):
    out = one_process / "resumed"
    args = ["sd_core.training.batch", "--prompts", str(one_process / "p.txt"), "--out", str(out), *FLAGS]
    printed = launch(1, [*args, "--stop-after", "2"])
    assert "2 images in" in printed.stdout and "3 left" in printed.stdout
    finished = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in out.iterdir()}
    assert sorted(finished) == NAMES[:2]
    printed = launch(2, args)
    assert "3 images in" in printed.stdout and "2 already there" in printed.stdout
    for name, (inode, mtime) in finished.items():
        assert (out / name).stat().st_ino == inode and (out / name).stat().st_mtime_ns == mtime, name
    for name in NAMES:
        assert (out / name).read_bytes() == (one_process / "one" / name).read_bytes(), name


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_files(tmp_path):
    """SIGKILL a one-process run once a few images exist, rerun on two processes: the finished files are
    kept as they were, and the folder ends byte-identical to an uninterrupted run's."""
    (tmp_path / "p.txt").write_text("".join(f"a red circle number {i}\n" for i in range(24)))
    args = ["--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=ROOT)
    killed = subprocess.Popen([sys.executable, "-m", "sd_core.training.batch", *args, "--out", str(tmp_path / "killed")],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while len(list((tmp_path / "killed").glob("*.png"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    finished = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in (tmp_path / "killed").glob("*.png")}
    assert 3 <= len(finished) < 24, len(finished)  # killed part way
    printed = launch(2, ["sd_core.training.batch", *args, "--out", str(tmp_path / "killed")])
    assert f"{24 - len(finished)} images in" in printed.stdout
    for name, (inode, mtime) in finished.items():
        path = tmp_path / "killed" / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime), name
    launch(1, ["sd_core.training.batch", *args, "--out", str(tmp_path / "straight")])
    names = sorted(path.name for path in (tmp_path / "straight").iterdir())
    assert len(names) == 24 and sorted(path.name for path in (tmp_path / "killed").iterdir()) == names
    for name in names:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
