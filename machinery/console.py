"""What the scripts print: an expected error as one line, Ctrl-C and SIGTERM as one line, progress bars in
the first process only."""
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager

from tqdm import tqdm

from machinery.errors import BadRecord, CheckpointError, ConfigError


@contextmanager
def one_line_errors(script: str, *expected: type, interrupted=None):
    """Run a script's main: an expected error (a bad record or setting, a refused checkpoint, a missing
    file or another OS error such as a full disk, or one of `expected`) is printed as `SCRIPT: error:
    MESSAGE` on stderr, exit status 2, as argparse does for a bad flag, also when a DataLoader worker raised
    it; anything else is a bug and
    keeps its traceback. Ctrl-C, and SIGTERM (what a scheduler sends before it kills a job), stop the
    script the same way: whatever was being saved is dropped (checkpoints.save_checkpoint), and one line
    says so, then `interrupted()`, e.g. how to resume; exit status 130 (Ctrl-C) or 143 (SIGTERM)."""
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        yield
    except (BadRecord, ConfigError, CheckpointError, OSError, *expected) as e:
        print(f"{script}: error: {original_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets the signal: one line
            how = f"; {interrupted()}" if interrupted else ""
            print(f"{script}: {'stopped by SIGTERM' if terminated else 'interrupted'}{how}", file=sys.stderr)
        sys.exit(143 if terminated else 130)
    finally:
        if main_thread and previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def original_message(e: BaseException) -> str:
    """What to print of an expected error. An OS error names its file and the cause ('out/ckpt.pt: cannot
    write: No space left on device'). An error raised in a DataLoader worker reaches the main process as the
    same type with the message 'Caught X in DataLoader worker process N. Original Traceback (...)': its
    last line holds the original."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e)
    if "in DataLoader worker process" not in text:
        return text
    found = list(re.finditer(rf"^[\w.]*{type(e).__name__}: (.*?)\s*(?=^\S|\Z)", text, flags=re.M | re.S))
    return found[-1].group(1) if found else text


def progress(iterable, **kw):
    """A tqdm bar at a terminal, only in the first process under torchrun."""
    return tqdm(iterable, leave=False, disable=None if os.environ.get("RANK", "0") == "0" else True, **kw)
