"""What the scripts print: an expected error as one line, Ctrl-C and SIGTERM as one line, progress bars in
the first process only."""
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

from machinery.errors import BadRecord, CheckpointError, ConfigError, NonFiniteLoss, PeerStopped

_stops = []  # the signals (SIGINT, SIGTERM) this script was sent
_deferred = [False]  # True while train.py's steps run: a signal then waits for the next step boundary


@contextmanager
def one_line_errors(script: str):
    """Run a script's main: an expected error (a bad record or setting, a refused checkpoint, an OS error such
    as a full disk, a run gone non-finite) is printed as `SCRIPT: error: MESSAGE`, exit status 2, as argparse
    does for a bad flag, also when a DataLoader worker raised it; anything else is a bug and keeps its
    traceback. Ctrl-C and SIGTERM (a scheduler's, before it kills a job) stop the script at once, or at the next
    step boundary while deferred (train.py's steps); one line says so, with what the KeyboardInterrupt carries
    (a run's advice, machinery/run.py), exit status 130 or 143. Under torchrun an error every process meets is
    printed by rank 0 alone, a bad record by the rank that met it; a process whose peer stopped exits 2,
    silently unless it has advice (PeerStopped)."""
    _stops.clear()
    _deferred[0] = False

    def on_signal(signum, frame):
        _stops.append(signum)
        if not _deferred[0]:
            raise KeyboardInterrupt

    rank, torchrun = int(os.environ.get("RANK", "0")), "RANK" in os.environ
    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)  # an ignored one stays so
                if main_thread and signal.getsignal(s) is not signal.SIG_IGN}
    code = None
    try:
        yield
    except (BadRecord, ConfigError, CheckpointError, NonFiniteLoss, PeerStopped, OSError) as e:
        own = _deferred[0] and isinstance(e, BadRecord) and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if rank == 0 or own:
            print(f"{script}: error: {f'rank {rank}: ' if own else ''}{original_message(e)}", file=sys.stderr)
        elif torchrun:  # torchrun stops the others once one process has: let rank 0, which meets the same
            for s in previous:  # error, say it first (it may still be starting up); this one is stopping
                signal.signal(s, signal.SIG_IGN)
            time.sleep(3)
        code = 2
    except (KeyboardInterrupt, RuntimeError) as e:
        # A Ctrl-C or SIGTERM also reaches the loader's workers (a terminal's Ctrl-C goes to its whole
        # process group; torchrun signals the workers' too): the loop then finds them gone as it fetches a
        # batch, at a step's start, and a peer process may find this one gone.
        if isinstance(e, RuntimeError) and not (torchrun and peer_gone(e) or _stops and "DataLoader worker" in str(e)):
            raise
        if isinstance(e, RuntimeError) and not _stops:  # the peer stopped on an error, and said so: stop too
            code = 2
        else:
            terminated = signal.SIGTERM in _stops
            if rank == 0:  # under torchrun every process gets the signal: one line
                said = f"; {e}" if isinstance(e, KeyboardInterrupt) and e.args else ""
                print(f"{script}: {'stopped by SIGTERM' if terminated else 'interrupted'}{said}", file=sys.stderr)
            code = 143 if terminated else 130
    finally:
        _deferred[0] = False
        _stops.clear()  # a signal is this script's: a run that follows in the same process starts without it
        for s, handler in previous.items():
            if torchrun and code is not None:  # torchrun sends SIGTERM to the others once one process has
                handler = signal.SIG_IGN        # stopped: this one is stopping already, with its own status
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, handler)
    if code is not None:
        sys.exit(code)


def peer_gone(e: BaseException) -> bool:
    """Is `e` what a torchrun process meets when another process of its run has ended (gloo's words)?"""
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("closed by peer", "reset by peer"))


def defer_signals(on: bool = True) -> bool:
    """train.py's steps (machinery/run.py): while on, a Ctrl-C or SIGTERM does not interrupt a step;
    signalled() says one came, and the run stops every process after the same step. Returns what it was."""
    if on and not _deferred[0]:  # a signal before this stopped the script at once: none is pending here
        _stops.clear()
    was, _deferred[0] = _deferred[0], on
    return was


def signalled() -> bool:
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
