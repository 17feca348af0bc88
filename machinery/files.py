"""Files written whole or not at all, under a temporary name no other process uses and removed on every way
out, and a run's log.jsonl appended a whole line at a time and read back whatever a killed run left."""
import json
import math
import os
from contextlib import contextmanager

from machinery.errors import BadRecord


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


def write_json(path: str, value):
    """A results file, whole or not at all. JSON has no NaN or infinity: a score that is not finite (an AUC of
    a label with one class) is written as null."""
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(finite(value), f, indent=1, allow_nan=False)


def finite(value):
    """`value` with every float that is not finite, at any depth of its dicts and lists, made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def append_line(path: str, record: dict):
    """One JSON line at the end of `path`, whole or not at all: an OS error (a full disk) cuts the file back
    to where it ended and comes out naming it. A line cut short by a killed process is read_log's to drop."""
    line = (json.dumps(finite(record), allow_nan=False) + "\n").encode()
    with open(path, "ab", buffering=0) as f:
        end, rest = f.tell(), memoryview(line)
        try:
            while rest:  # a write cut short by a full disk: the next one says why
                rest = rest[f.write(rest):]
        except OSError as e:
            f.truncate(end)
            raise OSError(e.errno, f"cannot write: {e.strerror}", path) from None


def read_log(path: str) -> list[dict]:
    """The records of a log.jsonl (none if it is not there yet). Blank lines and line ends of any kind are
    passed over, and a last line cut short (a run killed as it wrote) is dropped; any other line that is not
    a JSON object is refused, naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    records = []
    for k, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if k == len(lines) - 1:
                break
            raise BadRecord(f"{path}, line {n}: not a JSON object; remove the line (or the file) to go on")
        records.append(record)
    return records
