"""A run's bookkeeping, shared by train.py and finetune.py: what a resumed run puts back and may change, its
log.jsonl, the checks of what it is about to save, and what a stopped run says it kept."""
import json
import math
import os

import torch

from machinery import files
from machinery.checkpoints import FINETUNE_CHECKPOINT, WRITTEN, non_finite, read_checkpoint
from machinery.errors import ConfigError, NonFiniteLoss


def start(out: str, resumed: str, changed: dict, overwrite: bool, continues: bool, run_files, resume_hint: str,
          write: dict | None = None):
    """A run takes its folder once every check has passed (take), writes the texts of `write` ({name: text})
    into it, and says where it writes, what it continues and what it changes."""
    take(out, overwrite, continues, run_files, resume_hint)
    for name, text in (write or {}).items():
        files.write_text(os.path.join(out, name), text)
    print(f"writing to {os.path.abspath(out)}" + (f", continuing {resumed}" if resumed else "")
          + (", replacing the run there" if overwrite else ""))
    if changed:
        print("resuming with changed settings: " + describe(changed))


def take(out: str, overwrite: bool, continues: bool, run_files, resume_hint: str):
    """Make and hold the folder (files.hold), then, holding it: with --overwrite remove the earlier run in
    it; without, unless this run continues the one there, refuse a run that another process finished in
    the meantime (the check before, settings.check_out, ran without the folder held)."""
    files.hold(out)
    WRITTEN.clear()  # a checkpoint an earlier run in this process wrote is not this run's to advise
    if overwrite:
        files.replace_earlier_run(out, run_files)
    elif not continues:
        files.refuse_earlier_run(out, run_files, resume_hint)


def resume_changes(ckpt: dict | None, now: dict, world: int, may_change) -> dict:
    """What a resumed train.py run changes of the run it continues: the settings it may change (but where it
    writes), and where the processes or the batch changed, the effective batch and the lr with them (lr =
    blr x effective batch / 256: the schedule goes on at another scale). Nothing for a fresh run."""
    if ckpt is None:
        return {}
    before = ckpt.get("world_size", world)  # older checkpoints did not record it
    saved = {**now, **ckpt["config"]}  # a setting the checkpoint lacks: taken as unchanged
    changed = changed_settings(saved, {k: now[k] for k in ckpt["config"] if k in may_change - {"resume", "out"}})
    batch = (saved["batch_size"] * saved["accum_iter"] * before, now["batch_size"] * now["accum_iter"] * world)
    if before != world:
        changed["processes"] = (before, world)
    if batch[0] != batch[1]:
        changed["effective batch"] = batch
        changed["lr"] = (f"{saved['blr'] * batch[0] / 256:.3g}", f"{now['blr'] * batch[1] / 256:.3g}")
    return changed


def changed_settings(before: dict, after: dict) -> dict:
    """{name: (before, after)} for each setting of `after` whose value is not `before`'s: what a resumed
    run changes (train.py refuses some and prints the rest; finetune.py refuses any beyond a few)."""
    return {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}


def describe(changes: dict) -> str:
    """'epochs 1 -> 2, amp auto -> fp16'."""
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())


def resumed_state(last_path: str, config: dict, default: dict, may_change: set) -> dict | None:
    """A stopped fine-tuning run's last.pt, if it left one; refused when the run it continues had other
    settings than `config` beyond `may_change` (a setting the checkpoint lacks was at its `default`)."""
    if not os.path.exists(last_path):
        return None
    state = read_checkpoint(last_path, expect=FINETUNE_CHECKPOINT)
    changed = changed_settings({**default, **state["config"]}, {k: v for k, v in config.items() if k not in may_change})
    if changed:
        raise ConfigError(f"{last_path}: --resume continues the same run; changed: "
                          + describe(dict(sorted(changed.items()))))
    return state


def load_state(state: dict, model, optimizer, scaler):
    """Put a stopped run's weights, optimizer moments and fp16 loss scale back."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] and scaler.is_enabled():  # empty when the stopped run had no fp16 GradScaler
        scaler.load_state_dict(state["scaler"])


def set_rng(cpu_state: torch.Tensor, cuda_state, device: torch.device):
    """Put torch's generators back as a stopped run left them (drop-path and dropout draw from them): the
    CPU's, and on a GPU the device's (one state, train.py) or every device's (a list, finetune.py)."""
    torch.set_rng_state(cpu_state)
    if device.type == "cuda" and cuda_state is not None:
        if isinstance(cuda_state, list):
            torch.cuda.set_rng_state_all(cuda_state)
        else:
            torch.cuda.set_rng_state(cuda_state, device)


def truncate_log(path: str, key: str, last):
    """Drop what a stopped run logged after the checkpoint a resumed run continues: the lines whose `key`
    (epoch or step) is past `last`, and those without it (a check of the stopped run's end)."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line).get(key, math.inf) <= last]
        files.write_text(path, "".join(kept))  # whole or not at all: a Ctrl-C here loses no line


def write_json(path: str, value):
    """A results file, written whole or not at all (files.atomic). JSON has no NaN or infinity: a score
    that is not finite (an AUC of a label with one class) is written as null."""
    with files.atomic(path) as tmp, open(tmp, "w") as f:
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


def append_log(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def kept_and_cause(kept: list[str], lr_flag: str, fp16: bool) -> str:
    """The end of a non-finite stop's message: the checkpoints left as they were (those written), and the
    likely cause."""
    if not kept:
        said = "No checkpoint was written"
    elif len(kept) == 1:
        said = f"The last good checkpoint {kept[0]} is left as it was"
    else:
        said = f"The last good checkpoints {' and '.join(kept)} are left as they were"
    return (f"{said}. Likely cause: an lr too high for this run (lower {lr_flag})"
            + (", or fp16 overflowed (--amp bf16 or off)" if fp16 else ""))


def read_steps(pending: list, step: int, epoch: int, stop_note) -> tuple:
    """The (5,) tensors train.train_step left on the device since the last read (loss, loss_mim, loss_mlm,
    images skipped, processes signalled), read in one host-device sync. A loss that is not finite stops the
    run, naming its step and ending with stop_note(); a Ctrl-C or SIGTERM that any process got stops every
    process here, after the same step. Returns the last step's three losses and the images skipped in all."""
    values = torch.stack(pending).tolist()
    for k, (loss, loss_mim, loss_mlm, *_) in enumerate(values):
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"the loss is {loss} at step {step - len(values) + 1 + k} (epoch {epoch}): image "
                                f"loss {loss_mim}, report loss {loss_mlm}; stopping. {stop_note()}")
    if any(len(v) > 4 and v[4] > 0 for v in values):
        raise KeyboardInterrupt  # at a step boundary: console.one_line_errors says how to go on
    return values[-1][:3], int(sum(v[3] for v in values))


def refuse_non_finite(model: torch.nn.Module, where: str, stop_note):
    """Stop before saving weights that hold a NaN or an infinity: a step's loss is computed before its
    update, so the losses can all be finite while the weights after the last step are not."""
    broken = non_finite(model.state_dict())
    if broken:
        raise NonFiniteLoss(f"after {where}, {len(broken)} weight tensors are not finite (e.g. {broken[0]}), the "
                            f"losses before it were; stopping. {stop_note()}")


def existing(*paths: str) -> list[str]:
    return [p for p in paths if os.path.exists(p)]


def resumable(paths, resumed: bool) -> list[str]:
    """The checkpoints a stopped run may be continued from: those this process wrote, and, in a run that
    continues one (--resume), those it continues. Never an earlier run's that this one did not touch."""
    return [p for p in paths if os.path.exists(p) and (os.path.abspath(p) in WRITTEN or resumed)]


def loader_workers(requested: int | None, device: torch.device) -> int:
    """--num_workers, or by default what keeps the device fed: 2 on a CPU, which trains on the same cores
    (today's demo speed); on a GPU the CPUs of this process's share less one (the training process's own),
    from 2 to 8. One worker prepares about 250 base-size records a second from a 1,024-px film (bench.py
    loader), and an H200's compiled step takes 1,500: 6 workers; docs/performance.md."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 2
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def launcher() -> str:
    """How this process was started, for the command that continues it: python, or torchrun and its sizes
    (a resumed run of another world size changes the effective batch and the lr)."""
    if "WORLD_SIZE" not in os.environ:
        return "python"
    local, world = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    nodes = world // max(1, int(local))
    return f"torchrun{f' --nnodes {nodes}' if nodes > 1 else ''} --nproc_per_node {local}"


def resume_hint(kept: list[str], command: str) -> str:
    """What an interrupted run says last: the checkpoints it leaves, and the command that continues it."""
    if not kept:
        return "no checkpoint was written"
    many = len(kept) > 1
    return (f"the last checkpoint{'s' if many else ''} {', '.join(kept)} {'are' if many else 'is'} intact; "
            f"continue with: {command}")
