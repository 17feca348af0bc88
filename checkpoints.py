"""Reading and writing weights: this project's checkpoints (written atomically, read with a clear refusal),
MAE's and the released MRM's weights into this project's modules, and position tables resized to a new grid.
"""
import argparse
import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that is refused because loading it would run code."""


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, read with a clear refusal


def save_checkpoint(path: str, state: dict):
    """Write to a temporary file, flush it to disk, then rename over the old one: a crash at any moment
    leaves either the old checkpoint or the new one, never a half-written file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


# What MAE's and the released MRM's training checkpoints pickle besides tensors and plain values: the run's
# argparse.Namespace (util/misc.py save_model puts `args` beside the weights), and numpy scalars and dtypes,
# which training scripts often store (a best score, an epoch). Admitted by these names, nothing else;
# numpy 1.x pickled its scalars under numpy.core, numpy 2 under numpy._core.
_numpy_scalar = np.float64(0).__reduce__()[0]  # the function a pickled numpy scalar is rebuilt with
SAFE_GLOBALS = [argparse.Namespace, np.dtype, *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"},  # numeric dtypes
                (_numpy_scalar, "numpy.core.multiarray.scalar"), (_numpy_scalar, "numpy._core.multiarray.scalar")]
SAFE_GLOBAL_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}


def read_checkpoint(path, trust: bool = False) -> dict:
    """torch.load with weights_only=True: tensors, plain Python values and SAFE_GLOBALS only. A file that
    pickles any other object (which can run any code as it loads) is refused, naming the object, unless
    `trust` is set: then it is loaded with weights_only=False, for a file you know."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if trust:
        print(f"{path}: loading with weights_only=False (trusted: its pickled objects are rebuilt, code and all)")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = [] if trust else unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: it pickles {', '.join(unsafe)}, which weights do not need and which could run "
                "any code as it loads. If you trust where the file came from, pass --trust_checkpoint "
                "(trust=True in load_pretrained)") from None
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0] or "empty or cut short"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {reason})") from None


def unsafe_globals(path) -> list[str]:
    """The objects a checkpoint pickles beyond SAFE_GLOBALS, read from the pickle's opcodes (nothing runs)."""
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in SAFE_GLOBAL_NAMES]
    except Exception:  # not a zip checkpoint at all
        return []


CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "config", "model_config", "tokenizer", "rng")


def load_checkpoint(path: str, trust: bool = False) -> dict:
    ckpt = read_checkpoint(path, trust)  # refuses missing, truncated, unsafe and non-checkpoint files, naming them
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a train.py checkpoint (lacks {missing}); for weights only, use --init")
    return ckpt


# -----------------------------------------------------------------------------
# Loading MAE's, the released MRM's and this project's checkpoints


def _cls_and_grid(table: torch.Tensor) -> bool:
    return table.ndim == 3 and math.isqrt(table.shape[1] - 1) ** 2 == table.shape[1] - 1


def interpolate_pos_embed(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) position table, [CLS] first -> (1, 1 + grid*grid, D), the grid part resized
    bicubically, as the released fine-tuning does for a new input size (e.g. 14 x 14 -> 32 x 32 at 512 px).
    The same size returns the table itself."""
    if not _cls_and_grid(table):
        raise ValueError(f"position table of shape {tuple(table.shape)} is not [CLS] + a square grid")
    g = math.isqrt(table.shape[1] - 1)
    if g == grid:
        return table
    patches = table[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2).to(table.dtype)], dim=1)


def _compact(keys) -> list[str]:
    """['blocks.0.norm1.weight', 'blocks.1.norm1.weight'] -> ['blocks.{0-1}.norm1.weight']: exact, but short."""
    groups = {}
    for k in keys:
        m = re.search(r"\.(\d+)\.", k)
        pattern = k if m is None else k[: m.start()] + ".{}." + k[m.end():]
        groups.setdefault(pattern, []).append(-1 if m is None else int(m.group(1)))
    lines = []
    for pattern, idx in groups.items():
        if idx == [-1]:
            lines.append(pattern)
            continue
        idx = sorted(idx)
        contiguous = len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1))
        span = f"{idx[0]}-{idx[-1]}" if contiguous else ",".join(map(str, idx))
        lines.append(pattern.replace("{}", "{" + span + "}"))
    return lines


def load_pretrained(module: nn.Module, path, verbose: bool = True, trust: bool = False) -> dict:
    """Load encoder (and decoder) weights from `path` into `module` (a ViT, an MRM, or any module
    holding the ViT as `.encoder`), matching names across layouts:
      MAE / released MRM: {'model': {'cls_token', 'blocks.0...', 'decoder_blocks.0...', ...}}
      this project:       {'model': {'encoder.cls_token', 'image_decoder.decoder_blocks.0...', ...}}
    A position table for another input size is interpolated (interpolate_pos_embed), not skipped.
    Prints exactly which keys were missing, unexpected or of another shape; returns them as lists.
    The fixed sin-cos tables load like any tensor: the released MRM.pth brings its decoder table (built
    with the released helper's slip, see mrm.get_2d_sincos_pos_embed), which is what its decoder was trained with.
    """
    ckpt = read_checkpoint(path, trust)
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path}: not a model checkpoint "
                              "(expected a state dict, or a dict with one under 'model')")
    target = module.state_dict()
    loaded, unexpected, mismatched, resized = {}, [], [], []
    for key, value in sd.items():
        key = ".".join(part for part in key.split(".") if part not in ("module", "_orig_mod"))  # DDP, compile
        options = [key, "encoder." + key, "image_decoder." + key, key.removeprefix("encoder.")]
        name = next((k for k in options if k in target), None)
        if name is None:
            unexpected.append(key)
        elif name.endswith("pos_embed") and target[name].shape[1] != value.shape[1] and \
                target[name].shape[2:] == value.shape[2:] and _cls_and_grid(value) and _cls_and_grid(target[name]):
            # another input size (segmentation at 512 px): resize the grid instead of dropping the table
            grid = math.isqrt(target[name].shape[1] - 1)
            loaded[name] = interpolate_pos_embed(value, grid)
            resized.append(f"{name} {math.isqrt(value.shape[1] - 1)}^2 -> {grid}^2")
        elif target[name].shape != value.shape:
            mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(target[name].shape)}")
        else:
            loaded[name] = value
    if not loaded:
        raise CheckpointError(f"{path}: none of its {len(sd)} tensors matches a parameter of {type(module).__name__}")
    missing = [k for k in target if k not in loaded]
    module.load_state_dict(loaded, strict=False)
    if verbose:
        print(f"loaded {len(loaded)}/{len(target)} tensors of {type(module).__name__} from {path}")
        for title, keys in [("missing (left as initialised)", _compact(missing)),
                            ("unexpected (ignored)", _compact(unexpected)), ("shape mismatch (skipped)", mismatched),
                            ("position table interpolated (bicubic)", resized)]:
            if keys:
                print(f"  {title}: " + ", ".join(keys))
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched, "resized": resized}


def load_summary(report: dict, total: int, path) -> str:
    """load_pretrained's report in a few lines: how many of the module's `total` tensors came from `path`,
    the position tables resized, the unused ones counted by module (an encoder leaves the pre-training
    decoders unused, as expected), and by name what is missing or mismatched."""
    unused = {}
    for key in report["unexpected"]:
        unused[key.split(".")[0]] = unused.get(key.split(".")[0], 0) + 1
    lines = [f"encoder: {total - len(report['missing'])}/{total} tensors from {path}"
             + "".join(f"; position table {r}" for r in report["resized"])
             + ("; unused: " + ", ".join(f"{k} ({n})" for k, n in unused.items()) if unused else "")]
    for title, keys in (("missing, left as initialised", report["missing"]),
                        ("shape mismatch, skipped", report["mismatched"])):
        if keys:
            lines.append(f"  {title}: " + ", ".join(keys))
    return "\n".join(lines)
