"""Reading and writing weights: this project's checkpoints (written atomically, read with a clear refusal),
MAE's and the released MRM's weights into this project's modules, and position tables resized to a new grid.
"""
import argparse
import dataclasses
import math
import os
import re
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import recipes
from machinery.errors import CheckpointError, ConfigError
from machinery.files import atomic
from mrm import MRM, Block, MRMConfig, ViT


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, read with a clear refusal


class _Writes:
    """A file's write() as torch.save calls it, keeping the OS's error: torch reports a failed write as
    'unexpected pos 704 vs 598', the OS as 'No space left on device'."""

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


WRITTEN = set()  # the checkpoints this process wrote (absolute paths): what a stopped run may advise resuming


def save_checkpoint(path: str, state: dict):
    """Write to a temporary file, flush it to disk, then rename over the old one (files.atomic): a crash or
    a full disk at any moment leaves either the old checkpoint or the new one, never a half-written file."""
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
    WRITTEN.add(os.path.abspath(path))
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def non_finite(state: dict) -> list[str]:
    """The names of a state dict's floating-point tensors that hold a NaN or an infinity: train.py and
    finetune.py check what they are about to save with it, since a loss is computed before its update."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]


# What MAE's and the released MRM's training checkpoints pickle besides tensors and plain values: the run's
# argparse.Namespace (util/misc.py save_model puts `args` beside the weights), and numpy scalars and dtypes,
# which training scripts often store (a best score, an epoch). Admitted by these names, nothing else;
# numpy 1.x pickled its scalars under numpy.core, numpy 2 under numpy._core.
_numpy_scalar = np.float64(0).__reduce__()[0]  # the function a pickled numpy scalar is rebuilt with
SAFE_GLOBALS = [argparse.Namespace, np.dtype, *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"},  # numeric dtypes
                (_numpy_scalar, "numpy.core.multiarray.scalar"), (_numpy_scalar, "numpy._core.multiarray.scalar")]
SAFE_GLOBAL_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}


def read_checkpoint(path, trust: bool = False, expect: dict | None = None) -> dict:
    """torch.load with weights_only=True: tensors, plain Python values and SAFE_GLOBALS only. A file that
    pickles any other object (which can run any code as it loads) is refused, naming the object, unless
    `trust` is set: then it is loaded with weights_only=False, for a file you know.
    expect: {key: type} the file must hold, e.g. {'step': int, 'config': dict}; checked by check_fields."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    refuse_compressed_entries(path)
    if trust:
        print(f"{path}: loading with weights_only=False (trusted: its pickled objects are rebuilt, code and all)")
    try:
        if trust:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = [] if trust else unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: it pickles {', '.join(unsafe)}, which weights do not need and which could run "
                "any code as it loads. If you trust where the file came from, pass --trust_checkpoint "
                "(trust=True in load_pretrained)") from None
        legacy = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if legacy and not trust and not zipfile.is_zipfile(path):
            # the format before torch 1.6 (pickles, not a zip): torch cannot list its objects without
            # unpickling it, but its refusal names the first object beyond weights that it met
            raise CheckpointError(
                f"{path}: refused: a legacy (pre-1.6 torch.save, not zip) file that pickles at least "
                f"{legacy.group(1)}, which could run any code as it loads. If you trust where the file came "
                "from, pass --trust_checkpoint (trust=True in load_pretrained)") from None
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0] or "empty or cut short"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {reason})") from None
    if expect is not None:
        check_fields(path, ckpt, expect)
    return ckpt


def refuse_compressed_entries(path):
    """torch.save stores every entry of its zip uncompressed (ZIP_STORED). A compressed entry is not its
    work, and it can be a zip bomb: 1 MB of deflated zeros that torch.load expands into gigabytes. Only the
    zip's directory is read, not the entries."""
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
    """isinstance, except that a bool is not taken for an int (True is an int to Python, not a step count)."""
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def check_fields(path, ckpt, expect: dict):
    """Refuse a checkpoint that lacks a key of `expect` ({key: type}) or holds a value of another type."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict with {sorted(expect)}, found a {_kind(ckpt)}")
    missing = [k for k in expect if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: lacks {missing}")
    for key, kind in expect.items():
        if not _is(ckpt[key], kind):
            raise CheckpointError(f"{path}: {key}: expected {kind.__name__}, found {_kind(ckpt[key])}")


# -----------------------------------------------------------------------------
# train.py's checkpoints, checked field by field before anything is built from them

# what pretraining_state writes, and of what type
TRAIN_CHECKPOINT = {"model": dict, "optimizer": dict, "scaler": dict, "epoch": int, "step": int, "config": dict,
                    "model_config": dict, "tokenizer": str, "rng": dict}
CHECKPOINT_KEYS = tuple(TRAIN_CHECKPOINT)
# A model_config asking for more parameters than this is refused unless trusted: the base model has 151M (its
# decoders and 30,000 words included), and a file asking for depth 200000 would otherwise be built until the
# machine runs out of memory.
MAX_PARAMETERS = 2_000_000_000


def pretraining_state(model, optimizer, scaler, epoch: int, step: int, cfg, mcfg: MRMConfig, tok) -> dict:
    """train.py's ckpt.pt: what --resume needs to continue exactly, settings as plain dicts (no pickled objects)."""
    device = next(model.parameters()).device
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step": step, "config": dataclasses.asdict(cfg), "model_config": mcfg.to_dict(),
            "tokenizer": tok.to_str(), "world_size": world,  # processes: a resume on another count says so
            "rng": {"torch": torch.get_rng_state(),  # the data's randomness is seeded per sample: not here
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}


# what finetuning_state writes (finetune.py's last.pt, to --resume from), and of what type
FINETUNE_CHECKPOINT = dict(model=dict, optimizer=dict, scaler=dict, step=int, best=dict, config=dict, rng=torch.Tensor)


def finetuning_state(model, optimizer, scaler, step: int, best: dict, config: dict) -> dict:
    """finetune.py's last.pt at a validation: the weights, the optimizer, the best score so far and the
    random state drop-path continues from (every GPU's, on a GPU)."""
    cuda = next(model.parameters()).device.type == "cuda"
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "best": best, "config": config, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None}


def load_checkpoint(path: str, trust: bool = False) -> dict:
    """Read a train.py checkpoint for --resume, every field checked (validate_train_checkpoint)."""
    ckpt = read_checkpoint(path, trust)  # refuses missing, truncated, unsafe and non-checkpoint files, naming them
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a train.py checkpoint (lacks {missing}); for weights only, use --init")
    validate_train_checkpoint(path, ckpt, trust)
    return ckpt


def checked_model_config(path, d, trust: bool = False):
    """A checkpoint's model_config as an MRMConfig, each setting checked (MRMConfig.validate) and the model's
    size bounded by MAX_PARAMETERS (unless trusted), all before a layer is built."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: model_config: expected dict, found {_kind(d)}")
    try:
        cfg = MRMConfig.from_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{path}: model_config: {e}") from None
    n = num_parameters(cfg)
    if n > MAX_PARAMETERS and not trust:
        raise CheckpointError(f"{path}: model_config describes a model of {n:.3g} parameters, past the "
                              f"{MAX_PARAMETERS:.0e} loaded without --trust_checkpoint")
    return cfg


def num_parameters(cfg: MRMConfig) -> int:
    """sum(p.numel() for p in MRM(cfg).parameters()), by formula from the sizes alone, nothing allocated, so
    that an absurd model_config is refused before it is built. A layer added to mrm.py needs its line
    here too: tests/test_checkpoint_validation.py compares this count with the built model's."""
    def blocks(d, depth):  # Block: 2 LayerNorms, qkv and proj Linears, the MLP's two Linears
        h = int(d * cfg.mlp_ratio)
        return depth * (4 * d * d + 9 * d + 2 * d * h + h)

    D, L = cfg.embed_dim, (cfg.img_size // cfg.patch_size) ** 2
    # ViT: patch projection, [CLS], position table (1 + L rows), blocks, final norm
    n = D * cfg.in_chans * cfg.patch_size**2 + D + D + (1 + L) * D + blocks(D, cfg.depth) + 2 * D
    if cfg.mim_weight > 0:  # ImageDecoder: embed, mask token, position table, blocks, norm, prediction
        d = cfg.decoder_embed_dim
        out = (2 * cfg.patch_size if cfg.super_resolution else cfg.patch_size) ** 2 * cfg.in_chans
        n += D * d + d + d + (1 + L) * d + blocks(d, cfg.decoder_depth) + 2 * d + d * out + out
    if cfg.mlm_weight > 0:  # fusion_proj, then ReportDecoder: words, positions, norms, blocks, head
        t, V = cfg.text_embed_dim, cfg.vocab_size
        n += D * t + t + V * t + cfg.max_text_len * t + 2 * t + blocks(t, cfg.text_depth) + 2 * t + t * V + V
    if cfg.multimodal_mim:  # text_to_image
        n += cfg.text_embed_dim * cfg.decoder_embed_dim + cfg.decoder_embed_dim
    return n


def validate_train_checkpoint(path, ckpt: dict, trust: bool = False):
    """Every field of a train.py checkpoint (pretraining_state), checked so that a damaged or hand-made
    file is refused here, naming the field, rather than failing somewhere inside the resumed run."""
    from tokenizers import Tokenizer

    check_fields(path, ckpt, TRAIN_CHECKPOINT)
    for key in ("epoch", "step"):
        if ckpt[key] < 0:
            raise CheckpointError(f"{path}: {key}: expected an integer >= 0, found {ckpt[key]}")
    world = ckpt.get("world_size", 1)  # the processes that wrote it (checkpoints before it lack the key)
    if not _is(world, int) or world < 1:
        raise CheckpointError(f"{path}: world_size: expected an integer >= 1, found {world!r}")
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
        raise CheckpointError(f"{path}: scaler: expected {{}} or numbers under {list(numbers)}, found {scaler}")
    rng, state = ckpt["rng"], torch.get_rng_state()
    if not (torch.is_tensor(rng.get("torch")) and rng["torch"].dtype == torch.uint8
            and rng["torch"].shape == state.shape):
        raise CheckpointError(f"{path}: rng: expected 'torch': a uint8 tensor {tuple(state.shape)}, "
                              f"found {_kind(rng.get('torch'))}")
    cuda = rng.get("cuda", "no such key")
    if not (cuda is None or torch.is_tensor(cuda) and cuda.dtype == torch.uint8):
        raise CheckpointError(f"{path}: rng: expected 'cuda': None or a uint8 tensor, found {_kind(cuda)}")


def expected_state(cfg) -> tuple[dict, int]:
    """The state dict MRM(cfg) would have, built on the meta device (names, shapes, dtypes; nothing allocated),
    and how many of its parameters the optimizer steps. ViT draws its drop-path rates with .item(), which a
    meta tensor cannot answer, so the encoder is built without blocks and one Block stands for each."""
    with torch.device("meta"):
        model, block = MRM(dataclasses.replace(cfg, depth=0)), Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio)
    state = model.state_dict()
    state.update({f"encoder.blocks.{i}.{k}": v for i in range(cfg.depth) for k, v in block.state_dict().items()})
    trainable = sum(p.requires_grad for p in model.parameters()) + cfg.depth * len(list(block.parameters()))
    return state, trainable


def check_weights(path, weights: dict, target: dict):
    """The checkpoint's model state dict against the one its model_config implies: the same names, shapes,
    and floating-point tensors where the model has them (a complex, integer or bool tensor would be cast,
    losing its meaning, with at most a warning)."""
    wrong = [f"{k} is a {_kind(weights[k])}" for k in weights if k in target and not torch.is_tensor(weights[k])]
    wrong += [f"{k} is {tuple(weights[k].shape)}, expected {tuple(t.shape)}" for k, t in target.items()
              if torch.is_tensor(weights.get(k)) and weights[k].shape != t.shape]
    wrong += [f"{k} is {weights[k].dtype}, expected floating point" for k, t in target.items()
              if torch.is_tensor(weights.get(k)) and t.is_floating_point() and not weights[k].is_floating_point()]
    def first(keys):
        names = _compact(map(str, keys))
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    missing, unexpected = [k for k in target if k not in weights], [k for k in weights if k not in target]
    if missing:
        wrong.append(f"{len(missing)} missing: {first(missing)}")
    if unexpected:
        wrong.append(f"{len(unexpected)} unexpected: {first(unexpected)}")
    if wrong:
        raise CheckpointError(f"{path}: model: {'; '.join(wrong[:3])}" + (" ..." if len(wrong) > 3 else "")
                              + " (for the model its model_config describes)")


def check_optimizer(path, state: dict, n_params: int):
    """An optimizer.state_dict() for n_params parameters: {'state': {id: {name: tensor}}, 'param_groups':
    [{'params': [id, ...], ...}]}, each id once."""
    def refuse(expected, found):
        raise CheckpointError(f"{path}: optimizer: expected {expected}, found {found}")

    groups, moments = state.get("param_groups"), state.get("state")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        refuse("'param_groups': a list of dicts, each with a list 'params'", _kind(groups))
    ids = [i for g in groups for i in g["params"]]
    if not all(_is(i, int) for i in ids) or len(set(ids)) != len(ids) or len(ids) != n_params:
        refuse(f"'param_groups' to name {n_params} distinct parameter ids", f"{len(ids)}")
    if not isinstance(moments, dict) or not all(k in ids and isinstance(v, dict) for k, v in moments.items()):
        refuse("'state': a dict {parameter id: dict}", _kind(moments))
    for k, v in ((k, v) for s in moments.values() for k, v in s.items()):
        if k != "step" and torch.is_tensor(v) and not v.is_floating_point():
            refuse(f"'state' {k} to be floating point", v.dtype)


# -----------------------------------------------------------------------------
# Loading MAE's, the released MRM's and this project's checkpoints


def _cls_and_grid(table: torch.Tensor) -> bool:
    """Is `table` (1, 1 + g*g, D), a position table with [CLS] first? Asked before it is reshaped."""
    return table.ndim == 3 and table.shape[0] == 1 and table.shape[1] > 1 and \
        math.isqrt(table.shape[1] - 1) ** 2 == table.shape[1] - 1


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
            raise CheckpointError(f"{path}: {key}: expected a floating-point tensor, found {value.dtype}")
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


# -----------------------------------------------------------------------------
# The encoder a fine-tuning run starts from


def finetuning_encoder(cfg) -> tuple[str, MRMConfig, str, int]:
    """finetune.py's (init, encoder sizes, preset name, input size): the checkpoint, its sizes, and the
    fine-tuning input. Classification runs at the pre-training input; segmentation at
    recipes.SEG_INPUT_SIZE (512 for the base encoder, as released), the tiny demo at its own 64 px."""
    init = pick_init(cfg.init)
    sizes = encoder_sizes(init, cfg.preset, cfg.dataset, cfg.trust_checkpoint)
    preset = "base" if sizes.embed_dim == MRMConfig().embed_dim else "tiny"
    size = cfg.input_size or (recipes.SEG_INPUT_SIZE.get(preset, sizes.img_size) if cfg.task == "segment"
                              else sizes.img_size)
    if size % sizes.patch_size:
        raise ConfigError(f"--input_size {size} is not a multiple of the patch size {sizes.patch_size}")
    if init != "none":  # its weights must fit the encoder before a run replaces anything (--overwrite)
        load_pretrained(ViT(size, sizes.patch_size, sizes.in_chans, sizes.embed_dim, sizes.depth, sizes.num_heads,
                            sizes.mlp_ratio), init, verbose=False, trust=cfg.trust_checkpoint)
    return init, sizes, preset, size


def pick_init(init: str) -> str:
    """--init auto: the demo's pre-training checkpoint if `python train.py` left one, else none (scratch)."""
    if init == "auto":
        default = "out/ckpt.pt"
        if os.path.exists(default):
            return default
        print(f"no {default} (from `python train.py`): fine-tuning from scratch; --init PATH picks weights")
        return "none"
    return init


def encoder_sizes(init: str, preset: str, dataset: str, trust: bool = False) -> MRMConfig:
    """The encoder's sizes: from this project's checkpoint (it records them), else the preset ('auto': tiny
    for the synthetic records, else base)."""
    if init != "none":
        ckpt = read_checkpoint(init, trust)  # refuses a missing, broken or unsafe file, naming it
        if isinstance(ckpt, dict) and isinstance(ckpt.get("model_config"), dict):
            sizes = checked_model_config(init, ckpt["model_config"], trust)  # sizes in range
            if preset not in ("auto", "") and MRMConfig.from_preset(preset).embed_dim != sizes.embed_dim:
                raise CheckpointError(f"{init}: holds a {sizes.embed_dim}-wide encoder, not --preset {preset}")
            return sizes
    preset = preset if preset not in ("auto", "") else "tiny" if dataset == "synthetic" else "base"
    return MRMConfig.from_preset(preset)
