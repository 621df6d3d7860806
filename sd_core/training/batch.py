"""Generate many images from a prompt file, on one process or many (accelerate), resumably.

    python -m sd_core.training.batch --prompts prompts.txt --out images/                  # one process
    accelerate launch --multi_gpu --num_processes 2 -m sd_core.training.batch --prompts prompts.txt --out images/
    (on a machine without a GPU that starts two CPU processes; see sd_core.training.distributed)

The prompt file holds one prompt a line, or one JSON object a line with "prompt" and any other field of the
settings record (sd_core.pipelines.settings.GenerationSettings: negative_prompt, steps, guidance_scale, seed,
width, height, scheduler, prompt_syntax, clip_skip, ...) and "images" (how many); what a line omits comes from
the command line, else the model's recommended settings. Image i of prompt p is written to OUT/{p:05d}-{i:02d}.png and is seeded on its own:

    seed(p, i) = (S + i) mod 2**32,  S = the line's "seed" if it gives one, else (base * 1_000_003 + p * 1_009)

(base: --seed, 0 by default). Every image is generated alone (batch 1) from its own seed, so the images do
not depend on how the work is split: any number of processes writes the same files, byte for byte, as
long as each process runs the same kernels (same device, dtype and --threads: on this CPU, 9 of 32 images
differed in some pixels between 1 and 2 torch threads, none between 1 and 2 processes of 1 thread). Files are written
atomically and a rerun skips the ones that exist, so an interrupted run resumes where it stopped.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sd_core.checkpoints import catalog
from sd_core.checkpoints.catalog import EMBEDDED_GUIDANCE, EMBEDDED_STEPS, EMBEDDED_TEXT_TO_IMAGE
from sd_core.checkpoints.loading import DTYPES, load_pipeline
from sd_core.pipelines.generate import generate
from sd_core.pipelines.image_io import save_image
from sd_core.pipelines.settings import MAX_SEED, GenerationSettings
from sd_core.training.distributed import cpu_only, finish

LINE_KEYS = ("images",)  # besides the settings record's fields: how many images of the line


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to make: prompt line `index`, image `image` of it, and the settings it is made with."""
    index: int
    image: int
    settings: GenerationSettings

    @property
    def name(self) -> str:
        return f"{self.index:05d}-{self.image:02d}.png"


def image_seed(base: int, index: int, image: int, line_seed: int | None = None) -> int:
    """The seed of image `image` of prompt line `index` (the formula in the module docstring)."""
    start = line_seed if line_seed is not None else base * 1_000_003 + index * 1_009
    return (start + image) % (MAX_SEED + 1)


def read_prompts(path: Path) -> list[dict]:
    """The prompt file's lines as settings dicts; blank lines are skipped (they take no index)."""
    lines = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                settings = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error}).") from None
            if not isinstance(settings, dict) or not isinstance(settings.get("prompt"), str):
                raise ValueError(f"{path}, line {number}: needs a string \"prompt\"; got {line[:80]!r}.")
            lines.append(settings)
        else:
            lines.append({"prompt": line.strip()})
    if not lines:
        raise ValueError(f"{path} holds no prompts.")
    return lines


def plan(lines: list[dict], defaults: dict, base_seed: int, images: int) -> list[Job]:
    """Every image of every line, in file order: the global work list every process builds identically. A line's
    settings override `defaults` (the command line's, then the model's); each image is made alone (batch 1)."""
    jobs = []
    for index, line in enumerate(lines):
        line = dict(line)
        count = line.pop("images", images)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"prompt {index}: images must be a positive integer; got {count!r}.")
        try:
            settings = GenerationSettings.from_values({**defaults, **line, "images_per_prompt": 1})
        except ValueError as error:
            raise ValueError(f"prompt {index}: {error}") from None
        if settings.fast:  # its images would say "fast" and come from the parity path
            raise ValueError(f"prompt {index}: a prompt file runs the parity path; remove \"fast\" (and its options) "
                             f"from the line, or generate it alone with python -m sd_core generate --fast.")
        for image in range(count):
            seed = image_seed(base_seed, index, image, settings.seed)
            jobs.append(Job(index, image, settings.replace(seed=seed)))
    return jobs


def command_line_settings(args, pipe, embedded: bool) -> dict:
    """What the command line sets for every line (a line overrides it); a setting it leaves out is the model's
    recommended one."""
    recommended = catalog.recommended(EMBEDDED_TEXT_TO_IMAGE if embedded else args.model, pipe)
    given = dict(negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance,
                 scheduler=args.scheduler, height=args.height, width=args.width)
    return {**recommended, **{key: value for key, value in given.items() if value is not None}}


def run(args) -> int:
    """Generate every missing image of args.prompts into args.out; returns 0. Reads these attributes of
    `args` (the names `python -m sd_core generate` uses): prompts, out, model, steps, guidance, seed, height,
    width, scheduler, negative, batch (images per prompt), dtype, and optionally allow_pickle, stop_after and
    threads. A missing --seed (None) is base seed 0, so a rerun always resumes the same set."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    if args.out is None:
        raise ValueError("--prompts needs --out FOLDER, the folder the images are written to.")
    state = PartialState(cpu=cpu_only())
    threads = getattr(args, "threads", 0)
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out)
    lines = read_prompts(args.prompts)
    embedded = args.model is None
    pipe = load_pipeline(EMBEDDED_TEXT_TO_IMAGE if embedded else args.model, dtype=DTYPES[args.dtype],
                         device=state.device, allow_pickle=getattr(args, "allow_pickle", False))
    jobs = plan(lines, command_line_settings(args, pipe, embedded), args.seed or 0, args.batch)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    # Every process lists the missing images before any process writes one, so all agree on the list.
    todo = [job for job in jobs if not (out / job.name).is_file()]
    stop_after = getattr(args, "stop_after", None)
    state.wait_for_everyone()
    started = time.perf_counter()
    written = 0
    with state.split_between_processes(todo) as mine:
        bar = tqdm(total=len(todo), unit="image", disable=not state.is_main_process,
                   desc=f"generating ({state.num_processes} process{'es' * (state.num_processes > 1)})")
        for job in mine:
            if stop_after is not None and written >= stop_after:
                break
            save_image(generate(pipe, job.settings).images[0], out / job.name)
            written += 1
            bar.update(min(state.num_processes, bar.total - bar.n))  # the others keep the same pace
        bar.close()
    counts = gather_object([written]) if state.num_processes > 1 else [written]
    seconds = time.perf_counter() - started
    if state.is_main_process:
        total = sum(counts)
        print(f"{total} images in {seconds:.1f} s ({total / seconds if seconds else 0:.3f} images/s, "
              f"{state.num_processes} process{'es' * (state.num_processes > 1)}); "
              f"{len(jobs) - len(todo)} already there, {len(todo) - total} left; folder {out}")
    finish(state)
    return 0


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--prompts", type=Path, required=True, help="one prompt a line, or JSON lines of settings")
    p.add_argument("--out", type=Path, required=True, help="the folder the images go to (created)")
    p.add_argument("--model", help="diffusers folder or .safetensors file (default: the embedded model)")
    p.add_argument("--steps", type=int, help=f"sampling steps (default: the model's; embedded model: {EMBEDDED_STEPS})")
    p.add_argument("--guidance", type=float, help=f"guidance scale (embedded model: {EMBEDDED_GUIDANCE})")
    p.add_argument("--seed", type=int, default=0, help="base seed (see the formula above)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--scheduler")
    p.add_argument("--negative", help="negative prompt for lines that give none")
    p.add_argument("--batch", type=int, default=1, help="images per prompt for lines that give no \"images\"")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: PyTorch's default)")
    p.add_argument("--stop-after", type=int, help="each process stops after writing this many images")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_core.training.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
