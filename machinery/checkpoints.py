"""Checkpoints written atomically and read with a clear refusal; MAE's and the released MRM's weights loaded."""
import argparse
import dataclasses
import math
import os
import re
import zipfile
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.errors import CheckpointError, ConfigError
from machinery.files import atomic
from mrm import MRM, Block, MRMConfig


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, read with a clear refusal


class _Writes:
    """write() for torch.save, keeping the OS's error ('No space left on device', not torch's 'unexpected pos')."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save_checkpoint(path: str, state: dict):
    """Write, fsync, rename over the old one (files.atomic): a crash or full disk leaves the old file or the new."""
    with atomic(path) as tmp, open(tmp, "wb") as f:
        writes = _Writes(f)
        try:
            torch.save(state, writes)
        except RuntimeError:
            if writes.error is not None:
                raise writes.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def non_finite(state: dict) -> list[str]:
    """A state dict's float tensors holding a NaN or infinity, checked before a save (a loss precedes its update)."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]


# Besides tensors, MAE's and the released MRM's files pickle `args` (MAE's util/misc.py save_model) and numpy scalars
_numpy_scalar = np.float64(0).__reduce__()[0]  # the function a pickled numpy scalar is rebuilt with
SAFE_GLOBALS = [argparse.Namespace, np.dtype, *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"},  # numeric dtypes
                (_numpy_scalar, "numpy.core.multiarray.scalar"), (_numpy_scalar, "numpy._core.multiarray.scalar")]
SAFE_GLOBAL_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}


def read_checkpoint(path, trust: bool = False, expect: dict | None = None) -> dict:
    """torch.load(weights_only=not trust), refusing by name objects beyond SAFE_GLOBALS (code); expect: check_fields."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    refuse_compressed_entries(path)
    if trust:
        print(f"{path}: loading with weights_only=False (trusted: its pickled objects are rebuilt, code and all)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):  # consulted only when weights_only
            ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:
        unsafe = [] if trust else unsafe_globals(path)
        legacy = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        # pre-1.6 format (not a zip): its objects cannot be listed, but torch's refusal names the first one
        if unsafe or (legacy and not trust and not zipfile.is_zipfile(path)):
            what = (f"it pickles {', '.join(unsafe)}, which weights do not need and" if unsafe else
                    f"a legacy (pre-1.6 torch.save, not zip) file that pickles at least {legacy.group(1)},")
            raise CheckpointError(f"{path}: refused: {what} which could run any code as it loads. If you trust "
                                  "where the file came from, pass --trust_checkpoint (trust=True in "
                                  "load_pretrained)") from None
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0] or "empty or cut short"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {reason})") from None
    if expect is not None:
        check_fields(path, ckpt, expect)
    return ckpt


def refuse_compressed_entries(path):
    """Refuse a compressed zip entry (torch.save writes ZIP_STORED; deflated, a zip bomb): docs/errors.md."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format, or not a checkpoint: torch.load says which
    try:
        with zipfile.ZipFile(path) as z:
            packed = next((i for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED), None)
    except zipfile.BadZipFile:
        return  # a broken directory: torch.load refuses the file, naming it
    if packed is not None:
        raise CheckpointError(f"{path}: refused: entry {packed.filename} is compressed (method "
                              f"{packed.compress_type}, {packed.compress_size} -> {packed.file_size} bytes); "
                              "torch.save writes entries uncompressed")


def unsafe_globals(path) -> list[str]:
    """The objects a checkpoint pickles beyond SAFE_GLOBALS, read from the pickle's opcodes (nothing runs)."""
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in SAFE_GLOBAL_NAMES]
    except Exception:  # not a zip checkpoint at all
        return []


def _kind(value) -> str:
    """What a refusal says was found: a tensor's dtype and shape, a string itself, else the type's name."""
    if torch.is_tensor(value):
        return f"{value.dtype} tensor {tuple(value.shape)}"
    return repr(value[:40]) if isinstance(value, str) else type(value).__name__


def _is(value, kind) -> bool:
    """isinstance, except that a bool is not taken for an int (True is an int to Python, not a count or a size)."""
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def _refusal(path, field: str, expected, found) -> CheckpointError:
    """The one line every refused field gets: 'FILE: FIELD: expected ..., found ...'."""
    return CheckpointError(f"{path}: {field}: expected {expected}, found {found}")


def check_fields(path, ckpt, expect: dict):
    """Refuse a checkpoint that lacks a key of `expect` ({key: type}) or holds a value of another type."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict with {sorted(expect)}, found a {_kind(ckpt)}")
    missing = [k for k in expect if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: lacks {missing}")
    for key, kind in expect.items():
        if not _is(ckpt[key], kind):
            raise _refusal(path, key, kind.__name__, _kind(ckpt[key]))


# -----------------------------------------------------------------------------
# train.py's checkpoints, checked field by field before anything is built from them

# what train.py's ckpt.pt and finetune.py's last.pt (to --resume from) hold, and of what type
TRAIN_CHECKPOINT = {"model": dict, "optimizer": dict, "scaler": dict, "epoch": int, "step": int, "config": dict,
                    "model_config": dict, "tokenizer": str, "rng": dict}
FINETUNE_CHECKPOINT = dict(model=dict, optimizer=dict, scaler=dict, step=int, best=dict, config=dict, rng=torch.Tensor)
# a model_config past this is refused unless trusted (base: 151M): depth 200000 would be built till memory ran out
MAX_PARAMETERS = 2_000_000_000


def load_checkpoint(path: str, trust: bool = False) -> dict:
    """A train.py checkpoint for --resume, every field checked: a bad file is refused here, naming the field."""
    from tokenizers import Tokenizer

    ckpt = read_checkpoint(path, trust)  # refuses missing, truncated, unsafe and non-checkpoint files, naming them
    missing = [k for k in TRAIN_CHECKPOINT if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a train.py checkpoint (lacks {missing}); for weights only, use --init")
    check_fields(path, ckpt, TRAIN_CHECKPOINT)
    for key in ("epoch", "step"):
        if ckpt[key] < 0:
            raise _refusal(path, key, "an integer >= 0", ckpt[key])
    world = ckpt.get("world_size", 1)  # the processes that wrote it (checkpoints before it lack the key)
    if not _is(world, int) or world < 1:
        raise _refusal(path, "world_size", "an integer >= 1", repr(world))
    cfg = checked_model_config(path, ckpt["model_config"], trust)
    try:
        tok = Tokenizer.from_str(ckpt["tokenizer"])
    except Exception as e:
        reason = str(e).split("\n")[0][:80]
        raise CheckpointError(f"{path}: tokenizer: expected a tokenizers JSON string ({reason})") from None
    ids = (tok.get_vocab_size(), tok.token_to_id("[PAD]"), tok.token_to_id("[MASK]"))
    if ids != (cfg.vocab_size, cfg.pad_token_id, cfg.mask_token_id):
        raise CheckpointError(f"{path}: tokenizer: its vocabulary size, [PAD] and [MASK] ids are {ids}, "
                              f"model_config says {(cfg.vocab_size, cfg.pad_token_id, cfg.mask_token_id)}")

    expected, trainable = expected_state(cfg)
    check_weights(path, ckpt["model"], expected)
    check_optimizer(path, ckpt["optimizer"], trainable)

    scaler = ckpt["scaler"]  # empty when the run had no fp16 GradScaler, else its five numbers
    numbers = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
    if scaler and not all(_is(scaler.get(k), (int, float)) for k in numbers):
        raise _refusal(path, "scaler", f"{{}} or numbers under {list(numbers)}", scaler)
    rng, state = ckpt["rng"], torch.get_rng_state()
    if not (torch.is_tensor(rng.get("torch")) and rng["torch"].dtype == torch.uint8
            and rng["torch"].shape == state.shape):
        raise _refusal(path, "rng", f"'torch': a uint8 tensor {tuple(state.shape)}", _kind(rng.get("torch")))
    cuda = rng.get("cuda", "no such key")
    if not (cuda is None or torch.is_tensor(cuda) and cuda.dtype == torch.uint8):
        raise _refusal(path, "rng", "'cuda': None or a uint8 tensor", _kind(cuda))
    return ckpt


def check_model_config(cfg: MRMConfig) -> MRMConfig:
    """Refuse an MRMConfig no model can be built with (else an assert deep in a layer, or nothing, says it)."""
    for f in dataclasses.fields(cfg):  # each setting has its default's type; an int will do for a float
        v, kind = getattr(cfg, f.name), type(f.default)
        ok = (_is(v, (int, float)) and math.isfinite(v)) if kind is float else _is(v, kind)
        if not ok:
            raise ConfigError(f"{f.name} must be {'a finite number' if kind is float else kind.__name__}, got {v!r}")
        least = 0 if f.name.endswith(("depth", "_id")) else 1  # a model may have no block of a kind
        if kind is int and v < least:
            raise ConfigError(f"{f.name} must be {'>= 0' if least == 0 else 'positive'}, got {v}")
    checks = [
        (cfg.img_size % cfg.patch_size == 0,
         f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}"),
        (cfg.mlp_ratio > 0, f"mlp_ratio must be > 0, got {cfg.mlp_ratio}"),
        (cfg.pixel_std > 0, f"pixel_std must be > 0, got {cfg.pixel_std}"),
        (0 <= cfg.mask_ratio < 1, f"mask_ratio must be in [0, 1) so that some patch is encoded, got {cfg.mask_ratio}"),
        (cfg.mlm_weight >= 0, f"mlm_weight must be >= 0, got {cfg.mlm_weight}"),
        (cfg.mim_weight >= 0, f"mim_weight must be >= 0, got {cfg.mim_weight}"),
        (cfg.mlm_weight > 0 or cfg.mim_weight > 0, "mlm_weight and mim_weight are both 0: nothing to learn"),
        (cfg.fusion in ("gap", "gmp"), f"fusion must be 'gap' or 'gmp', got {cfg.fusion!r}"),
        (cfg.fusion_tokens in ("visible", "all"),
         f"fusion_tokens must be 'visible' or 'all', got {cfg.fusion_tokens!r}"),
        (not cfg.multimodal_mim or (cfg.mlm_weight > 0 and cfg.mim_weight > 0),
         "multimodal_mim needs both the image and the report decoder"),
    ]
    for width, heads in [("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads"),
                         ("text_embed_dim", "text_num_heads")]:
        w, h = getattr(cfg, width), getattr(cfg, heads)
        checks.append((w % h == 0, f"{width} {w} is not divisible by {heads} {h}"))
    for k in ("pad_token_id", "mask_token_id"):
        v = getattr(cfg, k)
        checks.append((v < cfg.vocab_size, f"{k} {v} is not an id of the vocabulary (0 to {cfg.vocab_size - 1})"))
    for width in ("embed_dim", "decoder_embed_dim"):  # 2D sin-cos: half the channels per axis, sin and cos
        w = getattr(cfg, width)
        checks.append((w % 4 == 0, f"{width} must be a multiple of 4 (the sin-cos position table), got {w}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def checked_model_config(path, d, trust: bool = False):
    """A checkpoint's model_config as a checked MRMConfig of at most MAX_PARAMETERS (unless trusted)."""
    if not isinstance(d, dict):
        raise _refusal(path, "model_config", "dict", _kind(d))
    try:
        cfg = check_model_config(MRMConfig.from_dict(d))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: model_config: {e}") from None
    n = num_parameters(cfg)
    if n > MAX_PARAMETERS and not trust:
        raise CheckpointError(f"{path}: model_config describes a model of {n:.3g} parameters, past the "
                              f"{MAX_PARAMETERS:.0e} loaded without --trust_checkpoint")
    return cfg


def on_meta(cfg) -> tuple[MRM, Block]:
    """MRM(cfg) on the meta device without its encoder's blocks, and one Block for each (ViT's .item() fails there)."""
    with torch.device("meta"):
        return MRM(dataclasses.replace(cfg, depth=0)), Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio)


def num_parameters(cfg) -> int:
    """MRM(cfg)'s number of parameters, counted on_meta: an absurd model_config is refused before any allocation."""
    model, block = on_meta(cfg)
    return sum(p.numel() for p in model.parameters()) + cfg.depth * sum(p.numel() for p in block.parameters())


def expected_state(cfg) -> tuple[dict, int]:
    """The state dict MRM(cfg) would have (on_meta), and how many of its parameters the optimizer steps."""
    model, block = on_meta(cfg)
    state = model.state_dict()
    state.update({f"encoder.blocks.{i}.{k}": v for i in range(cfg.depth) for k, v in block.state_dict().items()})
    trainable = sum(p.requires_grad for p in model.parameters()) + cfg.depth * len(list(block.parameters()))
    return state, trainable


def check_weights(path, weights: dict, target: dict):
    """Refuse weights unlike `target`: other names or shapes, or not float where it is (a cast loses the meaning)."""
    wrong = [f"{k} is a {_kind(weights[k])}" for k in weights if k in target and not torch.is_tensor(weights[k])]
    wrong += [f"{k} is {tuple(weights[k].shape)}, expected {tuple(t.shape)}" for k, t in target.items()
              if torch.is_tensor(weights.get(k)) and weights[k].shape != t.shape]
    wrong += [f"{k} is {weights[k].dtype}, expected floating point" for k, t in target.items()
              if torch.is_tensor(weights.get(k)) and t.is_floating_point() and not weights[k].is_floating_point()]
    missing, unexpected = [k for k in target if k not in weights], [k for k in weights if k not in target]
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            names = _compact(map(str, keys))
            wrong.append(f"{len(keys)} {what}: " + ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
    if wrong:
        raise CheckpointError(f"{path}: model: {'; '.join(wrong[:3])}" + (" ..." if len(wrong) > 3 else "")
                              + " (for the model its model_config describes)")


def check_optimizer(path, state: dict, n_params: int):
    """Refuse an optimizer.state_dict() that is not {'state': {id: {...}}, 'param_groups'} naming n_params ids once."""
    groups, moments = state.get("param_groups"), state.get("state")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise _refusal(path, "optimizer", "'param_groups': a list of dicts, each with a list 'params'", _kind(groups))
    ids = [i for g in groups for i in g["params"]]
    if not all(_is(i, int) for i in ids) or len(set(ids)) != len(ids) or len(ids) != n_params:
        raise _refusal(path, "optimizer", f"'param_groups' to name {n_params} distinct parameter ids", len(ids))
    if not isinstance(moments, dict) or not all(k in ids and isinstance(v, dict) for k, v in moments.items()):
        raise _refusal(path, "optimizer", "'state': a dict {parameter id: dict}", _kind(moments))
    for k, v in ((k, v) for s in moments.values() for k, v in s.items()):
        if k != "step" and torch.is_tensor(v) and not v.is_floating_point():
            raise _refusal(path, "optimizer", f"'state' {k} to be floating point", v.dtype)


# -----------------------------------------------------------------------------
# Loading MAE's, the released MRM's and this project's checkpoints


def _cls_and_grid(table: torch.Tensor) -> bool:
    """Is `table` (1, 1 + g*g, D), a position table with [CLS] first? Asked before it is reshaped."""
    return table.ndim == 3 and table.shape[0] == 1 and table.shape[1] > 1 and \
        math.isqrt(table.shape[1] - 1) ** 2 == table.shape[1] - 1


def interpolate_pos_embed(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D), [CLS] first -> (1, 1 + grid*grid, D), bicubic as released (14^2 -> 32^2 at 512 px)."""
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
        idx = sorted(idx)
        contiguous = len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1))
        span = f"{idx[0]}-{idx[-1]}" if contiguous else ",".join(map(str, idx))
        lines.append(pattern.replace("{}", "{" + span + "}"))  # a name without a number stays as it is
    return lines


def load_pretrained(module: nn.Module, path, verbose: bool = True, trust: bool = False, ckpt=None) -> dict:
    """Weights of MAE / the released MRM ('cls_token', 'decoder_blocks.0...') or this project ('encoder.cls_token')
    into a ViT, an MRM or a module with `.encoder`, a position table for another grid interpolated, sin-cos tables
    too (MRM.pth's has the released slip: mrm.get_2d_sincos_pos_embed); prints and returns what did not load.
    ckpt: the file at `path`, if the caller has read it already."""
    ckpt = read_checkpoint(path, trust) if ckpt is None else ckpt
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"{path}: not a model checkpoint "
                              "(expected a state dict, or a dict with one under 'model')")
    target = module.state_dict()
    loaded, unexpected, mismatched, resized = {}, [], [], []
    for key, value in sd.items():
        key = ".".join(part for part in key.split(".") if part not in ("module", "_orig_mod"))  # DDP, compile
        options = [key, "encoder." + key, "image_decoder." + key, key.removeprefix("encoder.")]
        name = next((k for k in options if k in target), None)
        if name is not None and target[name].is_floating_point() and not value.is_floating_point():
            # load_state_dict would cast it: a complex one with a warning, an integer or bool one silently
            raise _refusal(path, key, "a floating-point tensor", value.dtype)
        if name is None:
            unexpected.append(key)
        elif name.endswith("pos_embed") and _cls_and_grid(value) and _cls_and_grid(target[name]) and \
                target[name].shape[1] != value.shape[1] and target[name].shape[2:] == value.shape[2:]:
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
    """load_pretrained's report in a few lines, the unused counted by module (an encoder leaves the decoders)."""
    unused = Counter(key.split(".")[0] for key in report["unexpected"])
    lines = [f"encoder: {total - len(report['missing'])}/{total} tensors from {path}"
             + "".join(f"; position table {r}" for r in report["resized"])
             + ("; unused: " + ", ".join(f"{k} ({n})" for k, n in unused.items()) if unused else "")]
    for title, keys in (("missing, left as initialised", report["missing"]),
                        ("shape mismatch, skipped", report["mismatched"])):
        if keys:
            lines.append(f"  {title}: " + ", ".join(keys))
    return "\n".join(lines)
