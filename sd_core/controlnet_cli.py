"""The command line's ControlNets: `--controlnet MODEL:IMAGE[:SCALE]` (repeatable) and its per-ControlNet options,
read into the settings record's entries and the loaded models beside them (sd_core.__main__ registers the flags)."""
import argparse
import math

from sd_core.checkpoints.catalog import EMBEDDED_CONTROLNETS
from sd_core.checkpoints.controlnet import load_controlnet
from sd_core.pipelines.offload import execution_device
from sd_core.pipelines.sampling import dtype_of


def controlnet_argument(text: str) -> tuple[str, str, float]:
    """MODEL:IMAGE[:SCALE]: a trailing number is the scale (default 1), the image follows the last colon before it."""
    rest, colon, last = text.rpartition(":")
    try:
        scale = float(last) if colon else None
    except ValueError:
        scale = None
    if scale is None or not math.isfinite(scale):
        rest, scale = text, 1.0
    model, colon, image = rest.rpartition(":")
    if not colon or not model or not image:
        raise argparse.ArgumentTypeError(f"--controlnet takes MODEL:IMAGE[:SCALE], e.g. control_sd15_canny:edges.png"
                                         f":0.8; got {text!r}.")
    return model, image, scale


def per_controlnet(values: list, count: int, default, flag: str) -> list:
    """A ControlNet option given once (for every ControlNet) or once per --controlnet, in their order."""
    values = values or [default]
    if len(values) not in (1, count):
        raise ValueError(f"{flag} was given {len(values)} times for {count} --controlnet; give it once (for all) or "
                         f"once per --controlnet.")
    return values * count if len(values) == 1 else values


def controlnets_of(args, pipe) -> tuple[list, list]:
    """(the record's controlnets entries, the (ControlNetModel, image) pairs beside it) of the --controlnet flags;
    each ControlNet is loaded and checked against the model's UNet before any step. MODEL is a folder, a file, a hub
    id or an embedded ControlNet's name (shapes-controlnet), from any working folder."""
    count = len(args.controlnet)
    if not count:
        if args.preprocessor or args.control_start or args.control_end or args.guess_mode:
            raise ValueError("--preprocessor, --control-start, --control-end and --guess-mode need --controlnet.")
        return [], []
    options = zip(per_controlnet(args.preprocessor, count, "none", "--preprocessor"),
                  per_controlnet(args.control_start, count, 0.0, "--control-start"),
                  per_controlnet(args.control_end, count, 1.0, "--control-end"))
    entries, control = [], []
    for (model, image, scale), (preprocessor, start, end) in zip(args.controlnet, options):
        controlnet = load_controlnet(EMBEDDED_CONTROLNETS.get(model, model), dtype=dtype_of(pipe.unet),
                                     device=execution_device(pipe.unet), allow_pickle=args.allow_pickle)
        controlnet.check_fits(pipe.unet)
        entries.append((model, preprocessor, scale, start, end))
        control.append((controlnet, image))
    return entries, control
