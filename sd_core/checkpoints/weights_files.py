"""Weights files read safely: .safetensors (whole, or the header alone), opt-in weights-only pickles; only regular
files are opened (a FIFO named *.safetensors would block a reader forever), with bounded headers."""
import json
import os
import pickle
import stat
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sd_core.checkpoints.convert import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_weights(path: str | Path, allow_pickle: bool = False) -> dict:
    """A flat {name: tensor} from a .safetensors file, or (opted in) a weights-only pickle."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such checkpoint file: {path}")
    if not path.is_file():  # a FIFO would block the reader until a writer comes; a device may never end
        raise CheckpointError(f"{path.name} is not a regular file (a folder, FIFO or device): only weights files "
                              f"are read.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish.")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except (safetensors.SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt: {error}). "
                                  f"Download it again.") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; use .safetensors.")
    if not allow_pickle:
        raise CheckpointError(f"{path} is a pickle file, which can run code when loaded. sd_core refuses it unless "
                              f"you pass allow_pickle=True (--allow-pickle), which unpickles tensors only "
                              f"(torch.load(weights_only=True)); better, convert it to .safetensors.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} needs more than weights-only unpickling (it holds code or custom objects, "
                              f"or is corrupt): refused. ({first_line})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors.")
    return data


MAX_HEADER_BYTES = 100 * 2 ** 20  # the safetensors format's own bound on its JSON header


def read_safetensors_header(path: str | Path, max_bytes: int = MAX_HEADER_BYTES) -> tuple[list[str], dict]:
    """The tensor names and the string metadata of a .safetensors file, read from its header alone (no weights).
    Only a regular file is opened (a FIFO or device named *.safetensors would block or never end), and no more
    than `max_bytes` (at most the format's own header bound) is read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise CheckpointError(f"Cannot open {path.name}: {error.strerror}.") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path.name} is not a regular file: only weights files are read.")
        size_bytes = f.read(8)
        size = int.from_bytes(size_bytes, "little") if len(size_bytes) == 8 else -1
        if not 0 < size <= MAX_HEADER_BYTES:
            raise CheckpointError(f"{path.name} is not a valid safetensors file (its header length is {size}).")
        if size > max_bytes:
            raise CheckpointError(f"{path.name} has a {size}-byte header; files of its kind have at most "
                                  f"{max_bytes} bytes of header here: refused before reading it.")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a valid safetensors file (its header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    return list(header), metadata if isinstance(metadata, dict) else {}
