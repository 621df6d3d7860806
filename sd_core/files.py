"""Files written whole or not at all: images, single-file checkpoints and training checkpoints all go through
`atomic_path`, so a crash, Ctrl-C or SIGTERM leaves the old file or the whole new one, never half of one."""
import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path


class CannotWrite(OSError, ValueError):
    """The output path cannot be written (no permission, no space, not a folder...): an OSError, and a ValueError
    so that the CLI and the app show its one line like any other bad input."""


def ordinary_mode(is_folder: bool = False) -> int:
    """The mode a file (0666) or folder (0777) gets from open() or mkdir() under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_folder else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a unique hidden temporary path beside `path` to write to. When the block ends without error the
    temporary file gets an ordinary file's mode and is renamed over `path`; on any error (KeyboardInterrupt and
    SIGTERM in the main thread included) it is removed."""
    path = Path(path)
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as error:
        raise CannotWrite(f"Cannot write {path}: {error.strerror or error}. Choose another output path.") from None
    os.close(descriptor)
    try:
        with sigterm_as_exit():
            yield Path(temporary)
            os.chmod(temporary, ordinary_mode())  # mkstemp makes it private (0600)
            os.replace(temporary, path)
            temporary = None
    except OSError as error:
        raise CannotWrite(f"Cannot write {path}: {error.strerror or error}. Choose another output path.") from None
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


class sigterm_as_exit:
    """In the main thread, SIGTERM raises SystemExit(143) while a file is being written, so `finally` blocks run
    (Python's default is to die at once). Elsewhere (a server's worker thread) signals cannot be caught: a no-op."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    self.previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
            except (ValueError, OSError):  # not the main interpreter
                self.previous = None

    def __exit__(self, *_):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
