"""What a user typed, made into settings that work, or refused in one line before anything is read or written:
the flags (one per config field, each number checked as it is parsed), the combinations ranges cannot tell, the
weights a run starts from, and what the machine decides (--amp auto, --num_workers). A model's sizes are checked
by checkpoints.check_model_config: checkpoints carry them too."""
import argparse
import inspect
import math
import os
import re
from dataclasses import fields, replace

import torch

import recipes
from machinery.checkpoints import (check_model_config, checked_model_config, load_pretrained, load_summary,
                                   read_checkpoint)
from machinery.errors import CheckpointError, ConfigError
from mrm import MRMConfig, Switches, ViT


# -----------------------------------------------------------------------------
# Flags


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, `SCRIPT: error: ...`, exit 2, as every expected error (no usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def bounded(kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` (int or float), finite, within [low, high] (an open end where asked)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{low}, "
                                             f"{high if high is not None else 'inf'}{')' if high_open else ']'}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def config_parser(config, prog: str, doc: str, choices: dict, limits: dict, shown_default=None,
                  given_only: bool = False):
    """A parser with one flag per field of the dataclass `config`, its own fields first, then those it inherits
    (train.py's mrm.Switches); a flag's help is the comment beside its field, its value checked against `limits`
    (name -> a `bounded` type) as it is parsed. given_only: the namespace holds only the flags given."""
    parser = OneLineParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                           argument_default=argparse.SUPPRESS if given_only else None)
    helps = {k: v for c in config.__mro__[::-1] if hasattr(c, "__dataclass_fields__")
             for k, v in re.findall(r"^    (\w+): [^#\n]*# (.*)$", inspect.getsource(c), flags=re.M)}
    inherited = {f.name for base in config.__bases__ if hasattr(base, "__dataclass_fields__") for f in fields(base)}
    for f in sorted(fields(config), key=lambda f: f.name in inherited):
        kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))  # int | None -> int
        shown = shown_default(f) if shown_default else f.default  # None: the help itself says it
        kw = {"help": (helps.get(f.name, "") + ("" if shown is None else f" (default: {shown})")).replace("%", "%%")}
        if not given_only:
            kw["default"] = f.default
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(f"--{f.name}", type=limits.get(f.name, kind), choices=choices.get(f.name), **kw)
    return parser


# -----------------------------------------------------------------------------
# The weights a run starts from


def encoder_weights(path: str, sizes: MRMConfig, size: int, trust: bool = False, say: str = "all", ckpt=None) -> dict:
    """The tensors --init gives an encoder of `sizes` at input `size` (MAE's, the released MRM's or this project's;
    a position table interpolated to a new grid), read once and checked before a run takes its folder. say: what
    is printed of the load, 'all' (train.py), 'summary' (finetune.py) or 'nothing'; ckpt: the file, if read."""
    encoder = ViT(size, sizes.patch_size, sizes.in_chans, sizes.embed_dim, sizes.depth, sizes.num_heads,
                  sizes.mlp_ratio)
    report = load_pretrained(encoder, path, verbose=say == "all" and int(os.environ.get("RANK", "0")) == 0,
                             trust=trust, ckpt=ckpt)
    if say == "summary":
        print(load_summary(report, len(encoder.state_dict()), path))
    return {k: v for k, v in encoder.state_dict().items() if k not in report["missing"]}


# -----------------------------------------------------------------------------
# Pre-training (train.py)


def check_pretraining(cfg, sizes: MRMConfig, ckpt: dict | None = None):
    """train.py's flags against the sizes they train (a resumed run's, else the preset's) and a resumed `ckpt`."""
    if ckpt is not None and cfg.epochs <= ckpt["epoch"]:
        raise ConfigError(f"--epochs {cfg.epochs}: {cfg.resume} has done {ckpt['epoch']} epochs already; to go on, "
                          f"give --epochs above {ckpt['epoch']}")
    patches = (sizes.img_size // sizes.patch_size) ** 2
    if int(patches * (1 - cfg.mask_ratio)) < 1:  # mrm.random_masking keeps this many
        most = math.floor((1 - 1 / patches) * 1e4) / 1e4  # 4 decimals, rounded down: a ratio that is accepted
        raise ConfigError(f"--mask_ratio {cfg.mask_ratio} leaves none of the {patches} patches visible: "
                          f"the encoder would see nothing (at most {most})")
    if cfg.data != "synthetic" and not os.path.isfile(cfg.data):
        raise FileNotFoundError(f"{cfg.data}: no such CSV file")
    if cfg.fusion_check == 1:
        raise ConfigError("--fusion_check 1: its other-film control needs another record; give 0 or at least 2")
    check_model_config(replace(sizes, **{f.name: getattr(cfg, f.name) for f in fields(Switches)}))


def check_steps(steps_per_epoch: int, records: int, world: int, batch_size: int, accum_iter: int):
    """An epoch of at least one optimizer step: every process's loader drops its last, incomplete batch."""
    if steps_per_epoch == 0:
        raise ConfigError(f"{records} records are too few for {world} x {batch_size} x {accum_iter}")


# -----------------------------------------------------------------------------
# Fine-tuning (finetune.py)


def check_finetuning(cfg):
    """finetune.py's lr grid: each a positive number, and no lr twice (one folder an lr)."""
    seen = {}
    for v in cfg.lr_grid.split(",") if cfg.lr_grid else []:
        try:
            ok = math.isfinite(float(v)) and float(v) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--lr_grid {cfg.lr_grid}: {v!r} is not a positive number")
        folder = f"lr_{float(v):g}"  # one folder an lr: a second run there would overwrite the first
        if folder in seen:
            raise ConfigError(f"--lr_grid {cfg.lr_grid}: {seen[folder]!r} and {v!r} are the same lr ({folder})")
        seen[folder] = v


def finetuning_encoder(cfg, say: str = "summary") -> tuple[str, MRMConfig, str, int, dict | None]:
    """finetune.py's encoder: (init, its sizes, preset name, input size, the init's weights or None), the weights
    read once, here, before a run replaces anything (--overwrite). Classification runs at the pre-training input,
    segmentation at recipes.SEG_INPUT_SIZE (512 for the base encoder, as released)."""
    init = pick_init(cfg.init)
    ckpt = None if init == "none" else read_checkpoint(init, cfg.trust_checkpoint)  # read once: sizes, weights
    sizes = encoder_sizes(init, cfg.preset, cfg.dataset, cfg.trust_checkpoint, ckpt)
    preset = "base" if sizes.embed_dim == MRMConfig().embed_dim else "tiny"
    size = cfg.input_size or (recipes.SEG_INPUT_SIZE.get(preset, sizes.img_size) if cfg.task == "segment"
                              else sizes.img_size)
    if size % sizes.patch_size:
        raise ConfigError(f"--input_size {size} is not a multiple of the patch size {sizes.patch_size}")
    weights = None if ckpt is None else encoder_weights(init, sizes, size, cfg.trust_checkpoint, say, ckpt)
    return init, sizes, preset, size, weights


def pick_init(init: str) -> str:
    """--init auto: the demo's pre-training checkpoint if `python train.py` left one, else none (scratch)."""
    if init == "auto":
        default = "out/ckpt.pt"
        if os.path.exists(default):
            return default
        print(f"no {default} (from `python train.py`): fine-tuning from scratch; --init PATH picks weights")
        return "none"
    return init


def encoder_sizes(init: str, preset: str, dataset: str, trust: bool = False, ckpt=None) -> MRMConfig:
    """The encoder's sizes: from this project's checkpoint (it records them), else the preset ('auto': tiny
    for the synthetic records, else base). ckpt: the file at `init`, if read already."""
    if init != "none":
        ckpt = read_checkpoint(init, trust) if ckpt is None else ckpt  # refuses a missing, broken or unsafe file
        if isinstance(ckpt, dict) and isinstance(ckpt.get("model_config"), dict):
            sizes = checked_model_config(init, ckpt["model_config"], trust)  # sizes in range
            if preset not in ("auto", "") and MRMConfig.from_preset(preset).embed_dim != sizes.embed_dim:
                raise CheckpointError(f"{init}: holds a {sizes.embed_dim}-wide encoder, not --preset {preset}")
            return sizes
    preset = preset if preset not in ("auto", "") else "tiny" if dataset == "synthetic" else "base"
    return MRMConfig.from_preset(preset)


# -----------------------------------------------------------------------------
# What the machine decides: --amp auto, --num_workers


def amp_dtype(amp: str, device: torch.device):
    """None (fp32), bf16, or fp16 (with a GradScaler). 'auto': bf16 where a GPU has it natively, else fp16; CPU fp32."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def loader_workers(requested: int | None, device: torch.device) -> int:
    """--num_workers, or what keeps the device fed: 2 on a CPU, which trains on the same cores; on a GPU this
    process's share of the CPUs less one, from 2 to 8 (measured: docs/performance.md)."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 2
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
