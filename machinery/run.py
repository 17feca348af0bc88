"""A run of train.py or finetune.py as one object: all of its life that is not the method, in a few sentences:

    with Run("train.py") as run:                     # however the script ends: one line, the folder let go
        run.check(cfg, ckpt)                         # may this run write --out? (--dry_run stops after this)
        run.open({"tokenizer.json": text}, device)   # take the folder: the lock, --overwrite, the first files
        run.restore(ckpt, model, optimizer, scaler)  # a stopped run's weights, moments, loss scale, RNG
        for _ in run.steps(epoch, ...):              # a bar; a Ctrl-C or SIGTERM now waits for a step boundary
            run.log_step(step, losses, write=...)    # a read of the device every --log_every steps, a log line
        run.save(state, recon=...)                   # the checkpoint, whole, and the pictures with it
        run.end_epoch()                              # every process waits for the save; a stop happens here

What it promises (docs/errors.md): a folder holds one script's run, which a fresh run leaves alone (--resume
continues it, --overwrite replaces it if it is this script's); one run writes a folder at a time; nothing of a
user's is removed; every file is written whole; a stop is one line naming what is kept and what continues it."""
import errno
import glob
import json
import math
import os
import re
import shlex
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

from machinery import console, pictures
from machinery.checkpoints import FINETUNE_CHECKPOINT, load_checkpoint, non_finite, read_checkpoint, save_checkpoint
from machinery.errors import ConfigError, NonFiniteLoss, PeerStopped
from machinery.files import append_line, read_log, write_json, write_text

try:
    import fcntl  # POSIX; elsewhere a folder is not locked (docs/errors.md)
except ImportError:
    fcntl = None

# Each script's run: the files that make a folder its run (a fresh run refuses a folder holding any, --overwrite
# removes them), those only it writes (whose run a folder holds, where no .lock says), its checkpoint, and what a
# resumed run may change: how it runs, not what it learns (train.py's lr follows the batch and process count).
SCRIPTS = {
    "train.py": dict(files=("ckpt.pt", "log.jsonl", "tokenizer.json", "recon.png", "curves.png"),
                     own=("ckpt.pt", "tokenizer.json", "recon.png"), checkpoint="ckpt.pt", lr_flag="--blr",
                     may_change={"resume", "out", "overwrite", "epochs", "batch_size", "accum_iter", "num_workers",
                                 "amp", "compile", "save_every", "log_every", "skip_bad", "fusion_check",
                                 "fusion_every", "trust_checkpoint", "dry_run"}),
    "finetune.py": dict(files=("results.json", "curves.png", "lr_*/log.jsonl", "lr_*/best.pt", "lr_*/last.pt"),
                        own=("results.json", "lr_*/log.jsonl", "lr_*/best.pt", "lr_*/last.pt"), checkpoint="last.pt",
                        lr_flag="--lr", may_change={"resume", "out", "overwrite", "num_workers", "amp", "eval_every",
                                                    "trust_checkpoint", "dry_run"}),
}
NAMES = {"loss_mim": "image loss", "loss_mlm": "report loss"}  # how a stop names the values beside the loss
_held = {}  # folder (real path) -> the open .lock whose lock this process holds


class Run:
    """A run of `script`, 'train.py' or 'finetune.py'. As a context manager it frames the script's main
    (console.one_line_errors), adding a stop's advice, and lets the folder go however the script ends."""

    def __init__(self, script: str):
        self.script, self.kind, self.main = script, SCRIPTS[script], int(os.environ.get("RANK", "0")) == 0
        self.cfg = self.out = self.held = self.kept = None  # kept: (the checkpoint a stop names, its epoch)
        self.continues, self.opened, self.changes, self.written = False, False, {}, set()
        self.part, self.pending, self.last, self.device, self.fp16 = "", [], {}, torch.device("cpu"), False
        self.epoch = self.images = self.skipped = self.seen = 0  # train.py's epoch under way (run.steps)

    def __enter__(self):
        self.framing = console.one_line_errors(self.script)
        self.framing.__enter__()
        return self

    def __exit__(self, kind, error, trace):
        try:
            self.close(ended=error is not None)
        except KeyboardInterrupt as stop:  # a signal that came as the run ended
            error = stop
        # a Ctrl-C or SIGTERM also stops the loader's workers and, under torchrun, the other processes: the
        # first to be met may be a worker or a peer found gone
        gone = isinstance(error, RuntimeError) and ("DataLoader worker" in str(error) or console.peer_gone(error))
        if isinstance(error, KeyboardInterrupt) and not error.args or gone and console.signalled():
            error = KeyboardInterrupt(self.advice())
        elif console.peer_gone(error) and self.kept:
            error = PeerStopped(f"another process of this run stopped; {self.advice()}")
        return self.framing.__exit__(type(error) if error else None, error, trace)

    # ------------------------------------------------------------------------- before anything is written

    def resumed(self, path: str, trust: bool = False) -> dict | None:
        return load_checkpoint(path, trust) if path else None  # train.py's --resume, every field checked

    def check(self, cfg, ckpt: dict | None = None):
        """May this run (cfg: its script's config) write cfg.out? Asked before anything is read or written, by
        --dry_run too: a folder (or none yet) that no other process writes, holding no run of the other script,
        nor one of this script unless --resume continues it or --overwrite replaces it."""
        self.cfg, self.out = cfg, cfg.out
        self.continues = bool(cfg.resume) and (self.script == "finetune.py" or os.path.abspath(cfg.out)
                                               == os.path.dirname(os.path.abspath(cfg.resume)))
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"--out {self.out} is a file, not a folder")
        if self.continues and cfg.overwrite:  # (a resume into another folder may replace what is there)
            raise ConfigError("--resume continues the run in its folder and --overwrite replaces it: give one")
        if self.main and os.path.isfile(os.path.join(self.out, ".lock")):
            self._lock(probe=True)  # refused if another process holds it
        earlier = self._files()
        if cfg.overwrite and getattr(cfg, "init", "") and os.path.abspath(cfg.init) in {
                os.path.abspath(os.path.join(self.out, p)) for p in earlier}:
            raise ConfigError(f"--init {cfg.init} is a file of the run in --out {self.out}, which --overwrite "
                              "replaces: copy it elsewhere first, or pick another --out")
        self._refuse_earlier(earlier)
        halves = [p for p in glob.glob(os.path.join(glob.escape(self.out), "lr_*", "best.pt"))
                  if not os.path.exists(os.path.join(os.path.dirname(p), "last.pt"))] if self.continues else []
        if self.script == "finetune.py" and halves:
            raise ConfigError(f"{halves[0]} is there but not last.pt, so this lr's run cannot be continued: pass "
                              "--overwrite instead of --resume to start the run again")
        if ckpt is not None:
            self.changes, self.kept = self._changes(ckpt), (cfg.resume, ckpt["epoch"])

    def _changes(self, ckpt: dict) -> dict:
        """What a resumed train.py run changes, refused beyond how it runs; with the processes or the batch, the
        effective batch and the lr (lr = blr x batch / 256)."""
        now, world = asdict(self.cfg), int(os.environ.get("WORLD_SIZE", 1))
        saved = {k: v for k, v in ckpt["config"].items() if k in now and k != "overwrite"}
        changed = {k: (v, now[k]) for k, v in saved.items() if v != now[k] and k not in ("resume", "out")}
        refused = sorted(changed.keys() - self.kind["may_change"])
        if refused:
            raise ConfigError(f"{self.cfg.resume}: a resumed run keeps its model and data; cannot change {refused} "
                              "(start a new run, with --init to begin from these weights)")
        before, saved = ckpt.get("world_size", world), {**now, **saved}  # older checkpoints lack world_size
        batch = (saved["batch_size"] * saved["accum_iter"] * before, now["batch_size"] * now["accum_iter"] * world)
        if before != world:
            changed["processes"] = (before, world)
        if batch[0] != batch[1]:
            changed["effective batch"] = batch
            changed["lr"] = (f"{saved['blr'] * batch[0] / 256:.3g}", f"{now['blr'] * batch[1] / 256:.3g}")
        return changed

    def _files(self, script: str | None = None) -> list[str]:
        """The files of `script`'s run (this one's by default) in --out, relative to it."""
        found = {p for pattern in SCRIPTS[script or self.script]["files"]
                 for p in glob.glob(os.path.join(glob.escape(self.out), pattern))}
        return sorted(os.path.relpath(p, self.out) for p in found if os.path.isfile(p))

    def _owner(self) -> str | None:
        """Whose run --out holds: the script its .lock names, else the one whose own files are there, or None."""
        held = _held.get(os.path.realpath(self.out))
        try:  # through the held descriptor, if any: closing another one of the file would let the lock go
            if held is not None:
                named = os.pread(held, 64, 0).decode().strip()
            else:
                with open(os.path.join(self.out, ".lock")) as f:
                    named = f.read().strip()
        except (OSError, UnicodeDecodeError):
            named = ""
        owns = [s for s in SCRIPTS if any(glob.glob(os.path.join(glob.escape(self.out), p)) for p in SCRIPTS[s]["own"])]
        return named if named in SCRIPTS and self._files(named) else (owns or [None])[0]

    def _refuse_earlier(self, earlier: list[str]):
        """A run does not write into a folder that holds the other script's run, and a fresh one not into a folder
        that holds an earlier run's files: it would replace some and leave the rest, mixing two runs. The refusal
        says what continues it, if anything can."""
        owner = self._owner()
        if owner not in (None, self.script):
            raise ConfigError(f"--out {self.out} holds a {owner} run ({shown(self._files(owner))}): --overwrite "
                              f"replaces only a {self.script} run; pick another --out")
        if not earlier or self.cfg.overwrite or self.continues:
            return
        kept = [os.path.join(self.out, p) for p in earlier if os.path.basename(p) == self.kind["checkpoint"]]
        resume = f"--resume {shlex.quote(kept[0])}" if kept and self.script == "train.py" else "--resume"
        raise ConfigError(f"--out {self.out} holds an earlier run ({shown(earlier)})" + (
            f": pass {resume} to continue it, --overwrite to replace it, or another --out" if kept else
            ", which wrote no checkpoint: pass --overwrite to replace it, or another --out"))

    # ------------------------------------------------------------------------- taking the folder

    def open(self, files: dict | None = None, device: torch.device | None = None, fp16: bool = False):
        """Take --out, every check passed (rank 0; the others wait): hold it, replace the earlier run (--overwrite)
        or refuse one finished meanwhile, write `files` ({name: text}), say where it writes and what it changes.
        device: where the run's numbers live; fp16: a likely cause of a non-finite stop."""
        self.device, self.fp16 = device or self.device, fp16
        if self.main:
            os.makedirs(self.out, exist_ok=True)
            self._lock()
            earlier = self._files()
            self._refuse_earlier(earlier)  # again, holding it: another run may have written it meanwhile
            os.ftruncate(_held[self.held], 0)  # the folder now names its run's script
            os.pwrite(_held[self.held], f"{self.script}\n".encode(), 0)
            for rel in earlier if self.cfg.overwrite else []:
                os.remove(os.path.join(self.out, rel))
                if os.path.dirname(rel) and not os.listdir(os.path.join(self.out, os.path.dirname(rel))):
                    os.rmdir(os.path.join(self.out, os.path.dirname(rel)))  # an lr_* folder, once empty
            self.opened = True
            for name, text in (files or {}).items():
                write_text(self.path(name), text)
            print(f"writing to {os.path.abspath(self.out)}" + (f", continuing {self.cfg.resume}" if self.kept else "")
                  + (", replacing the run there" if self.cfg.overwrite else ""))
            if self.changes:
                print("resuming with changed settings: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                                                      self.changes.items()))
        if dist.is_initialized():
            dist.barrier()

    def _lock(self, probe: bool = False):
        """Hold --out until the run ends (`probe`: only ask whether another process holds it), refusing it if
        another does. A POSIX record lock on .lock, which names the script: it dies with its process, and loader
        workers do not inherit it. Held, a temporary file of this script's run can only be a killed run's."""
        key = os.path.realpath(self.out)
        if probe and key in _held:
            return
        if key not in _held:  # a probe takes a shared lock, read-only: probes do not refuse each other
            fd = os.open(os.path.join(key, ".lock"), os.O_RDONLY if probe else os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.lockf(fd, (fcntl.LOCK_SH if probe else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"--out {self.out} is being written by another run; wait for it, or pick "
                                      "another --out") from None
                raise
            if probe:
                return os.close(fd)  # no lock of this process is lost: it held none on the file
            _held[key] = fd
        self.held = key
        for pattern in self.kind["files"]:  # e.g. ckpt.pt.4242.tmp, lr_0.1/best.pt.4242.tmp, curves.png.4242.tmp.png
            for stale in glob.glob(os.path.join(glob.escape(key), pattern + ".*.tmp*")):
                if re.fullmatch(r".+\.\d+\.tmp(\.png)?", os.path.basename(stale)):
                    os.remove(stale)

    def restore(self, state: dict, model, optimizer, scaler):
        """Put a stopped run back as its checkpoint left it: weights, moments, fp16 loss scale and torch's generators
        (drop-path draws from them; the data's draws are seeded per sample); drop what it logged after it."""
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and scaler.is_enabled():  # empty when the stopped run had no fp16 GradScaler
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"]  # train.py's {'torch', 'cuda'}; finetune.py's the CPU's, and every GPU's in 'cuda_rng'
        cpu, cuda = (rng["torch"], rng["cuda"]) if isinstance(rng, dict) else (rng, state.get("cuda_rng"))
        torch.set_rng_state(cpu)
        device = next(model.parameters()).device
        if device.type == "cuda" and cuda is not None:
            torch.cuda.set_rng_state_all(cuda) if isinstance(cuda, list) else torch.cuda.set_rng_state(cuda, device)
        key = "epoch" if self.script == "train.py" else "step"
        if self.main and os.path.exists(self.path("log.jsonl")):  # whole or not at all: a Ctrl-C loses no line
            kept = [r for r in read_log(self.path("log.jsonl")) if r.get(key, math.inf) <= state[key]]
            write_text(self.path("log.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))

    def resumable(self, part: str, config: dict) -> dict | None:
        """finetune.py: begin the fit of `part` (lr_<lr>); with --resume, the state its stopped run left (last.pt),
        refused if that run had other settings than `config` (one it lacks: at its default)."""
        self.part = part
        os.makedirs(self.path(""), exist_ok=True)
        if not (self.cfg.resume and os.path.exists(self.path("last.pt"))):
            if os.path.exists(self.path("log.jsonl")):  # a fresh fit starts a fresh log
                os.remove(self.path("log.jsonl"))
            return None
        state = read_checkpoint(self.path("last.pt"), expect=FINETUNE_CHECKPOINT)
        saved = {**asdict(type(self.cfg)()), **state["config"]}
        changed = sorted((k, saved.get(k), v) for k, v in config.items()
                         if k not in self.kind["may_change"] and saved.get(k) != v)
        if changed:
            raise ConfigError(f"{self.path('last.pt')}: --resume continues the same run; changed: "
                              + ", ".join(f"{k} {a} -> {b}" for k, a, b in changed))
        return state

    # ------------------------------------------------------------------------- while it runs

    def steps(self, epoch: int, epochs: int, n: int, images_per_step: int):
        """train.py: the n steps of epoch `epoch` (from 0), with a bar at a terminal (rank 0); from here a Ctrl-C
        or SIGTERM waits for a step boundary. The epoch ends with a read of its last steps and one printed line."""
        console.defer_signals()
        self.epoch, self.images, self.skipped, self.seen = epoch + 1, images_per_step, 0, 0
        start = self.tick = time.perf_counter()
        self.bar = tqdm(range(n), desc=f"epoch {epoch + 1}/{epochs}", disable=None if self.main else True,
                        leave=False, dynamic_ncols=True)
        yield from self.bar
        self.bar.close()
        self._read()
        seconds, v = time.perf_counter() - start, self.values
        if self.main:
            print(f"epoch {epoch + 1}/{epochs}: step {self.step}, loss {v['loss']:.4f} (image {v['loss_mim']:.4f}, "
                  f"report {v['loss_mlm']:.4f}), {seconds:.0f} s, {n * images_per_step / seconds:.0f} images/s"
                  + (f", {self.skipped} unreadable images skipped" if self.skipped else ""))

    def log_step(self, step: int, values: dict, write: bool = True, **extra):
        """One step's values, tensors on the device: nothing waits for them. When `write`, all since the last read
        are read in one host-device sync (a non-finite value, or a signal to any process, stops the run here),
        and a line of log.jsonl holds the step, `extra` and the values."""
        self.pending.append((step, values))
        if not write:
            return
        self._read()
        line = {"step": step, **({"epoch": self.epoch} if self.epoch else {}), **extra,
                **{k: v for k, v in self.values.items() if k != "skipped"}}
        if self.epoch:  # train.py: the speed since the last line, and the unreadable images skipped
            now = time.perf_counter()
            line["images_per_s"], self.tick, self.seen = self.seen / (now - self.tick), now, 0
            self.bar.set_postfix(loss=f"{line['loss']:.3f}", mim=f"{line['loss_mim']:.4f}", img_s=
                                 f"{line['images_per_s']:.0f}", mlm=f"{line['loss_mlm']:.3f}", lr=f"{extra['lr']:.2e}",
                                 refresh=False)
            line.update({"skipped_images": self.skipped} if self.skipped else {})
        self.log(line)
        self.last = line

    def read(self, step: int, values: dict) -> dict:
        """finetune.py: `values` (tensors on the device) at `step`, read now and checked as log_step does."""
        self.log_step(step, values, write=False)
        self._read()
        return self.values

    def _read(self):
        if not self.pending:
            return
        names = list(self.pending[-1][1])
        rows = torch.stack([torch.stack([v[k].float() for k in names]) for _, v in self.pending]).tolist()
        for (step, _), row in zip(self.pending, rows):
            if not all(map(math.isfinite, row)):
                v = dict(zip(names, row))
                named = ", ".join(f"{NAMES[k]} {v[k]}" for k in NAMES if k in v)
                where = f"at step {step} (epoch {self.epoch})" if self.epoch else \
                    f"before step {step} at lr {self.part[3:]}"
                raise NonFiniteLoss(f"the loss is {v.get('loss', row[0])} {where}{': ' + named if named else ''}; "
                                    f"stopping. {self._kept_and_cause()}")
        self.step, self.values = self.pending[-1][0], dict(zip(names, rows[-1]))
        self.skipped += sum(int(row[names.index("skipped")]) for row in rows) if "skipped" in names else 0
        self.seen, self.pending = self.seen + len(rows) * self.images, []
        self.end_epoch()  # every process asks, after the same step

    def log(self, record: dict):
        if self.main:  # appended whole (files.append_line)
            append_line(self.path("log.jsonl"), record)

    def save(self, state: dict, best: dict | None = None, recon: dict | None = None, line: dict | None = None):
        """The run's checkpoint (train.py: ckpt.pt; finetune.py: its lr's last.pt, and best.pt with `best`) with what
        a resume puts back, written whole; never non-finite weights, which finite losses do not rule out (a step's
        loss comes before its update; every process checks, so all stop alike). Then `line` is logged, and
        curves.png redrawn from the log, train.py's recon.png from `recon` (checks.reconstruct)."""
        broken = non_finite(state["model"])
        if broken:
            where = f"step {state['step']}" + (f" (epoch {state['epoch']})" if "epoch" in state else
                                               f" at lr {self.part[3:]}")
            raise NonFiniteLoss(f"after {where}, {len(broken)} weight tensors are not finite (e.g. {broken[0]}), "
                                f"the losses before it were; stopping. {self._kept_and_cause()}")
        self.kept = (self.path(self.kind["checkpoint"]), state.get("epoch"))  # every rank: what a stop names
        if not self.main:
            return
        cuda = self.device.type == "cuda"  # torch's generators, and the processes (a resume on another count
        if self.script == "train.py":      # says how the effective batch and the lr change)
            state.update(rng={"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda
                              else None}, world_size=dist.get_world_size() if dist.is_initialized() else 1)
        else:
            state.update(rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all() if cuda else None)
        if line is not None:
            self.log(line)
        if best is not None:
            save_checkpoint(self.path("best.pt"), best)
        save_checkpoint(self.path(self.kind["checkpoint"]), state)
        self.written.add(self.path(self.kind["checkpoint"]))
        if recon is not None:
            from tokenizers import Tokenizer
            pictures.save_recon(recon, Tokenizer.from_str(state["tokenizer"]), self.path("recon.png"))
        if self.script == "train.py":
            pictures.pretraining_curves(self.path("log.jsonl"), self.path("curves.png"))
        else:
            pictures.finetuning_run_curves(self.cfg)

    def end_epoch(self):
        """Every process waits here for rank 0's save, and all of them stop here if any was sent a Ctrl-C or
        SIGTERM meanwhile (its save finished first)."""
        stop = torch.full((), float(console.signalled()), device=self.device)
        if dist.is_initialized():
            dist.all_reduce(stop)
        if stop.item() > 0:
            raise KeyboardInterrupt  # the framing says what is kept and how to go on

    def write(self, name: str, value):
        if self.main:  # a results file: JSON, whole, a score that is not finite written null
            write_json(os.path.join(self.out, name), value)

    # ------------------------------------------------------------------------- how it ends

    def close(self, ended: bool = False) -> dict:
        """The run's end: the folder let go (a notebook holds none of a run that stopped), and a signal no step
        boundary met stops the run now, unless it `ended` already. Returns the last line logged."""
        fd = _held.pop(self.held, None)
        if fd is not None:
            os.close(fd)
        if not ended and console.defer_signals(False) and console.signalled():
            raise KeyboardInterrupt
        return self.last

    def advice(self) -> str:
        """What a stopped run says last: the checkpoints it keeps, and the command that continues it."""
        if self.cfg is None:  # stopped before its settings were read
            return "no checkpoint was written"
        if self.script == "finetune.py":
            kept = sorted(p for p in glob.glob(os.path.join(glob.escape(self.out), "lr_*", "last.pt"))
                          if p in self.written or self.cfg.resume)
            s = "s" if len(kept) > 1 else ""
            return (f"the last checkpoint{s} {', '.join(kept)} {'are' if s else 'is'} intact; continue with: the same "
                    "command with --resume" + " in place of --overwrite" * self.cfg.overwrite) if kept \
                else self._nothing_kept()
        if not self.kept or not os.path.exists(self.kept[0]):
            return self._nothing_kept()
        path, epoch = self.kept
        if epoch is not None and epoch >= self.cfg.epochs:
            return f"the run had finished: {path} holds its {epoch} epochs"
        elsewhere = os.path.dirname(os.path.abspath(path)) != os.path.abspath(self.out)
        replace = " --overwrite" * bool(elsewhere and self.opened and self._files())  # what it began there goes
        return (f"the last checkpoint {path} is intact; continue with: {launcher()} train.py --resume "
                f"{shlex.quote(path)} --epochs {self.cfg.epochs}" + (f" --out {shlex.quote(self.out)}" * elsewhere)
                + replace)

    def _nothing_kept(self) -> str:
        return "no checkpoint was written" + ("; the same command with --overwrite starts it again"
                                              if self.opened and self._files() else "")

    def _kept_and_cause(self) -> str:
        """The end of a non-finite stop's message: the checkpoints left as they were, and the likely cause."""
        kept = [p for p in map(self.path, ("ckpt.pt", "best.pt", "last.pt")) if os.path.exists(p)]
        said = ("No checkpoint was written" if not kept else f"The last good checkpoint {kept[0]} is left as it was"
                if len(kept) == 1 else f"The last good checkpoints {' and '.join(kept)} are left as they were")
        return (f"{said}. Likely cause: an lr too high for this run (lower {self.kind['lr_flag']})"
                + (", or fp16 overflowed (--amp bf16 or off)" if self.fp16 else ""))

    def path(self, name: str) -> str:
        return os.path.join(self.out, self.part, name)  # finetune.py: in the folder of the lr under way


def shown(files: list[str]) -> str:
    return ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")


def launcher() -> str:
    """How this process was started, for the command that continues it: python, or torchrun and its sizes."""
    if "WORLD_SIZE" not in os.environ:
        return "python"
    local, world = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    nodes = world // max(1, int(local))
    return f"torchrun{f' --nnodes {nodes}' if nodes > 1 else ''} --nproc_per_node {local}"
