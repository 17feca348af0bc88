"""A run's bookkeeping, shared by train.py and finetune.py: what a resumed run puts back and may change, its
log.jsonl, the checks of what it is about to save, and what a stopped run says it kept."""
import json
import math
import os

import torch

from machinery.checkpoints import FINETUNE_CHECKPOINT, non_finite, read_checkpoint
from machinery.errors import ConfigError, NonFiniteLoss


def start(out: str, resumed: str, changed: dict):
    """A run's first lines: where it writes, what it continues and what it changes; its folder made."""
    print(f"writing to {os.path.abspath(out)}" + (f", continuing {resumed}" if resumed else ""))
    if changed:
        print("resuming with changed settings: " + describe(changed))
    os.makedirs(out, exist_ok=True)


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
        with open(path, "w") as f:
            f.writelines(kept)


def write_json(path: str, value):
    """A results file, written whole or not at all (a temporary file renamed over it)."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(f"{path}.tmp", path)


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
    """The (4,) tensors train.train_step left on the device since the last read (loss, loss_mim, loss_mlm,
    images skipped), read in one host-device sync; a loss that is not finite stops the run, naming its step
    and ending with stop_note(). Returns the last step's three losses and the images skipped in all."""
    values = torch.stack(pending).tolist()
    for k, (loss, loss_mim, loss_mlm, _) in enumerate(values):
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"the loss is {loss} at step {step - len(values) + 1 + k} (epoch {epoch}): image "
                                f"loss {loss_mim}, report loss {loss_mlm}; stopping. {stop_note()}")
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


def resume_hint(kept: list[str], command: str) -> str:
    """What an interrupted run says last: the checkpoints it leaves, and the command that continues it."""
    if not kept:
        return "no checkpoint was written"
    many = len(kept) > 1
    return (f"the last checkpoint{'s' if many else ''} {', '.join(kept)} {'are' if many else 'is'} intact; "
            f"continue with: {command}")
