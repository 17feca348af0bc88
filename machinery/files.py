"""A run's folder and the files in it: each file written whole or not at all, under a temporary name no
other process uses and removed on every way out; the folder held by one run at a time; and a folder that
holds an earlier run never replaced without --resume or --overwrite."""
import errno
import glob
import os
import re
from contextlib import contextmanager

from machinery.errors import ConfigError

# what makes a folder a run's (paths in it, glob patterns): a fresh run refuses a folder holding any of these,
# --overwrite removes them. train.py's default out/ may hold finetune.py's out/finetune/: not train.py's.
TRAIN_RUN = ("ckpt.pt", "log.jsonl", "tokenizer.json", "recon.png", "curves.png")
FINETUNE_RUN = ("results.json", "curves.png", "lr_*/log.jsonl", "lr_*/best.pt", "lr_*/last.pt")

try:
    import fcntl  # POSIX; elsewhere a folder is not locked (docs/errors.md)
except ImportError:
    fcntl = None


@contextmanager
def atomic(path: str, suffix: str = ""):
    """Yields a temporary path beside `path` (`suffix` keeps a format's extension) that only this process
    writes; renamed over `path` when the block ends, removed if it ends with any error or interrupt, so a
    reader finds the old file or the new one, never a half-written one nor a temporary file left behind.
    An OS error (no space, read-only) comes out naming `path`."""
    tmp = f"{path}.{os.getpid()}.tmp{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename in (None, tmp):  # the file the user knows, not ours
            raise OSError(e.errno, f"cannot write: {e.strerror}", path) from None
        raise


def write_text(path: str, text: str):
    """A text file (tokenizer.json), whole or not at all."""
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def earlier_run(out: str, patterns) -> list[str]:
    """The files of an earlier run in `out` that match `patterns` (TRAIN_RUN, FINETUNE_RUN), relative to it."""
    found = {p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(out), pattern))}
    return sorted(os.path.relpath(p, out) for p in found if os.path.isfile(p))


def refuse_init_in_earlier_run(out: str, patterns, init: str):
    """--overwrite would remove the earlier run's files before --init is read from one of them."""
    if init and os.path.abspath(init) in {os.path.abspath(os.path.join(out, p)) for p in earlier_run(out, patterns)}:
        raise ConfigError(f"--init {init} is a file of the run in --out {out}, which --overwrite replaces: copy it "
                          "elsewhere first, or pick another --out")


def refuse_earlier_run(out: str, patterns, resume_hint: str):
    """A fresh run does not write into a folder that holds another run's files: it would replace some of
    them and leave the rest, mixing two runs."""
    earlier = earlier_run(out, patterns)
    if earlier:
        raise ConfigError(f"--out {out} holds an earlier run ({', '.join(earlier[:3])}"
                          f"{', ...' if len(earlier) > 3 else ''}): pass {resume_hint} to continue it, --overwrite to "
                          "replace it, or another --out")


_held = {}  # folder -> the open lock file whose lock this process holds


def hold(out: str):
    """Make `out` and hold it for this process until it ends: a second process that tries to write the
    same folder is refused in one line. The lock is the kernel's, a POSIX record lock on out/.lock: it dies
    with its process (a killed run leaves none), and the loader workers a run forks do not inherit it."""
    os.makedirs(out, exist_ok=True)
    key = os.path.realpath(out)
    if fcntl is None or key in _held:
        return
    fd = os.open(os.path.join(key, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"--out {out} is being written by another run; wait for it, or pick another --out") \
                from None
        raise
    _held[key] = fd
    # held: no other process writes here, so a temporary file here is a killed run's (SIGKILL, a power cut)
    for pattern in ("*.tmp*", os.path.join("*", "*.tmp*")):  # the folder and its lr_* folders
        for stale in glob.glob(os.path.join(glob.escape(key), pattern)):
            if re.search(r"\.\d+\.tmp(\.\w+)?$", stale):
                os.remove(stale)


def release(out: str):
    """Let `out` go (the end of a run); a process that ends lets go of everything it held."""
    fd = _held.pop(os.path.realpath(out), None)
    if fd is not None:
        os.close(fd)


def release_all():
    """Let every folder go: a script's end, however it ends (console.one_line_errors), so that a process that
    goes on (a notebook) holds none of a run that stopped."""
    for out in list(_held):
        release(out)


def replace_earlier_run(out: str, patterns):
    """--overwrite: remove every file of the earlier run (and its lr_* folders, once empty), so that nothing
    of it stays beside the new run's files. Called once the new run's settings and inputs have been checked."""
    for rel in earlier_run(out, patterns):
        os.remove(os.path.join(out, rel))
        if os.path.dirname(rel):  # an lr_* folder: removed once empty (rmdir refuses a folder holding anything)
            try:
                os.rmdir(os.path.join(out, os.path.dirname(rel)))
            except OSError:
                pass
