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
from machinery.files import release_all


_stops = []  # the signals (SIGINT, SIGTERM) this run was sent
_at_boundaries = [False]  # True while train.py's loop runs: a signal then waits for the next step boundary


@contextmanager
def one_line_errors(script: str, *expected: type, interrupted=None):
    """Run a script's main: an expected error (a bad record or setting, a refused checkpoint, a missing
    file or another OS error such as a full disk, or one of `expected`) is printed as `SCRIPT: error:
    MESSAGE` on stderr, exit status 2, as argparse does for a bad flag, also when a DataLoader worker raised
    it; anything else is a bug and keeps its traceback. Ctrl-C, and SIGTERM (what a scheduler sends before
    it kills a job), stop the script the same way: at once, whatever was being saved dropped
    (files.atomic), or inside train.py's loop at its next step boundary (stop_at_step_boundaries); one line
    says so, then `interrupted()`, e.g. how to resume; exit status 130 (Ctrl-C) or 143 (SIGTERM).

    Under torchrun every process runs this: an error every process meets (a setting, a file) is printed by
    rank 0 alone; a bad record met while training, by the rank that met it, named. A process whose peer
    stopped (gloo: 'Connection closed by peer') exits 2 too, silently: the peer said why."""
    _stops.clear()
    _at_boundaries[0] = False

    def on_signal(signum, frame):
        _stops.append(signum)
        if not _at_boundaries[0]:
            raise KeyboardInterrupt

    rank, torchrun = int(os.environ.get("RANK", "0")), "RANK" in os.environ
    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)  # an ignored one stays so
                if main_thread and signal.getsignal(s) is not signal.SIG_IGN}
    code = None
    try:
        yield
    except (BadRecord, ConfigError, CheckpointError, OSError, *expected) as e:
        own = _at_boundaries[0] and isinstance(e, BadRecord) and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if rank == 0 or own:
            print(f"{script}: error: {f'rank {rank}: ' if own else ''}{original_message(e)}", file=sys.stderr)
        code = 2
    except (KeyboardInterrupt, RuntimeError) as e:
        # A Ctrl-C or SIGTERM also reaches the loader's workers (a terminal's Ctrl-C goes to its whole
        # process group; torchrun signals the workers' too): the loop then finds them gone as it fetches a
        # batch, at a step's start, and a peer process may find this one gone ('closed by peer', gloo).
        peer_gone = torchrun and "closed by peer" in str(e)
        if isinstance(e, RuntimeError) and not (peer_gone or _stops and "DataLoader worker" in str(e)):
            raise
        if peer_gone and not _stops:  # the peer stopped on an error, and said so: stop too
            code = 2
        else:
            terminated = signal.SIGTERM in _stops
            if rank == 0:  # under torchrun every process gets the signal: one line
                how = f"; {interrupted()}" if interrupted else ""
                print(f"{script}: {'stopped by SIGTERM' if terminated else 'interrupted'}{how}", file=sys.stderr)
            code = 143 if terminated else 130
    finally:
        release_all()  # the folder a run held (machinery/files.py)
        _at_boundaries[0] = False
        _stops.clear()  # a signal is this run's: a run that follows in the same process starts without it
        for s, handler in previous.items():
            if torchrun and code is not None:  # torchrun sends SIGTERM to the others once one process has
                handler = signal.SIG_IGN        # stopped: this one is stopping already, with its own status
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, handler)
    if code is not None:
        sys.exit(code)


def stop_at_step_boundaries(on: bool = True):
    """train.py's loop: from here (on) a Ctrl-C or SIGTERM does not interrupt a step; stop_requested() says
    one came, train_step all-reduces that with its losses, and every process stops after the same step."""
    if on:  # a signal before the loop stopped the run at once: none is pending here
        _stops.clear()
    _at_boundaries[0] = on
    if not on and _stops:  # one came while the loop ended: stop now
        raise KeyboardInterrupt


def stop_requested() -> bool:
    return bool(_stops)


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
