"""Settings that cannot work, refused before anything is read or built, naming the first: the model's
sizes and switches (from code or from a checkpoint), and the combinations of flags that each script's
ranges (flags.bounded) cannot tell."""
import math
import os
from dataclasses import fields

from machinery.errors import ConfigError
from machinery.files import FINETUNE_RUN, TRAIN_RUN, refuse_earlier_run, refuse_init_in_earlier_run


def check_model_config(cfg):
    """Refuse an mrm.MRMConfig no model can be built with: sizes come from checkpoints as well as from code,
    and a bad one would otherwise surface as an assert deep inside a layer, or not at all."""
    for f in fields(cfg):  # each setting has its default's type; an int will do for a float
        v, kind = getattr(cfg, f.name), type(f.default)
        if kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:  # True is an int to Python, not a size
            ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
        if not ok:
            raise ConfigError(f"{f.name} must be {'a finite number' if kind is float else kind.__name__}, got {v!r}")
        least = 0 if f.name.endswith(("depth", "_id")) else 1  # a model may have no block of a kind
        if kind is int and v < least:
            raise ConfigError(f"{f.name} must be {'>= 0' if least == 0 else 'positive'}, got {v}")
    checks = [
        (cfg.img_size % cfg.patch_size == 0, f"img_size {cfg.img_size} is not a multiple of "
                                             f"patch_size {cfg.patch_size}"),
        (cfg.mlp_ratio > 0, f"mlp_ratio must be > 0, got {cfg.mlp_ratio}"),
        (cfg.pixel_std > 0, f"pixel_std must be > 0, got {cfg.pixel_std}"),
        # a ratio of 1 would leave nothing visible: nothing to pool, nothing to encode
        (0 <= cfg.mask_ratio < 1, f"mask_ratio must be in [0, 1) so that some patch is encoded, got {cfg.mask_ratio}"),
        (0 <= cfg.text_mask_ratio < 1, f"text_mask_ratio must be in [0, 1), got {cfg.text_mask_ratio}"),
        (cfg.mlm_weight >= 0, f"mlm_weight must be >= 0, got {cfg.mlm_weight}"),
        (cfg.mim_weight >= 0, f"mim_weight must be >= 0, got {cfg.mim_weight}"),
        (cfg.mlm_weight > 0 or cfg.mim_weight > 0, "mlm_weight and mim_weight are both 0: nothing to learn"),
        (cfg.fusion in ("gap", "gmp"), f"fusion must be 'gap' or 'gmp', got {cfg.fusion!r}"),
        (cfg.fusion_tokens in ("visible", "all"), f"fusion_tokens must be 'visible' or 'all', "
                                                  f"got {cfg.fusion_tokens!r}"),
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
        checks.append((getattr(cfg, width) % 4 == 0, f"{width} must be a multiple of 4 (the sin-cos "
                                                     f"position table), got {getattr(cfg, width)}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_images(images, cfg) -> bool:
    """MRM's input: high-res images (B, C, 2H, 2W), or (B, 1, 2H, 2W) gray for a 3-channel model. Returns
    whether they are that gray batch."""
    gray = images.ndim == 4 and images.shape[1] == 1 and cfg.in_chans == 3
    hr = 2 * cfg.img_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (1 if gray else cfg.in_chans, hr, hr):
        gray_too = f" or (B, 1, {hr}, {hr})" if cfg.in_chans == 3 else ""
        raise ValueError(f"MRM expects high-res images (B, {cfg.in_chans}, {hr}, {hr}){gray_too}, "
                         f"got {tuple(images.shape)}")
    return gray


def refuse_file_out(out: str):
    """--out must be a folder (or not exist yet): both scripts write several files into it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a folder")


def check_pretraining(cfg, sizes, ckpt: dict | None = None):
    """train.py's flags against the model sizes `sizes` (an mrm.MRMConfig) they will train and the checkpoint
    a resumed run continues, and its --out: a folder that holds an earlier run is refused unless --resume or
    --overwrite says what to do with it."""
    if ckpt is not None and cfg.epochs <= ckpt["epoch"]:
        raise ConfigError(f"--epochs {cfg.epochs}: {cfg.resume} has done {ckpt['epoch']} epochs already; to go on, "
                          f"give --epochs above {ckpt['epoch']}")
    check_out(cfg.out, TRAIN_RUN, cfg.resume, cfg.overwrite, continues_in(cfg.out, cfg.resume),
              f"--resume {os.path.join(cfg.out, 'ckpt.pt')}", cfg.init)
    patches = (sizes.img_size // sizes.patch_size) ** 2
    if int(patches * (1 - cfg.mask_ratio)) < 1:  # mrm.random_masking keeps this many
        most = math.floor((1 - 1 / patches) * 1e4) / 1e4  # 4 decimals, rounded down: a ratio that is accepted
        raise ConfigError(f"--mask_ratio {cfg.mask_ratio} leaves none of the {patches} patches visible: "
                          f"the encoder would see nothing (at most {most})")


def check_steps(steps_per_epoch: int, records: int, world: int, batch_size: int, accum_iter: int):
    """An epoch of at least one optimizer step: every process's loader drops its last, incomplete batch."""
    if steps_per_epoch == 0:
        raise ConfigError(f"{records} records are too few for {world} x {batch_size} x {accum_iter}")


def check_finetuning(cfg):
    """finetune.py's flags, as a run and a --dry_run check them: a bad lr grid (not a positive number, or an
    lr twice), an --out that is a file, and an --out that holds an earlier run (never emptied without
    --resume or --overwrite)."""
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
    check_out(cfg.out, FINETUNE_RUN, cfg.resume, cfg.overwrite, cfg.resume, "--resume",
              cfg.init if cfg.init not in ("auto", "none") else "")


def continues_in(out: str, resume: str) -> bool:
    """Does train.py's --resume continue the run in --out (its checkpoint's folder), not elsewhere?"""
    return bool(resume) and os.path.abspath(out) == os.path.dirname(os.path.abspath(resume))


def check_out(out: str, patterns, resume, overwrite: bool, continues: bool, resume_hint: str, init: str = ""):
    """--out must be a folder (or not exist yet), and one that holds an earlier run (files.TRAIN_RUN,
    FINETUNE_RUN) only if this run continues that run (--resume, `continues`) or --overwrite replaces it
    (and --init is not one of its files)."""
    refuse_file_out(out)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in its folder and --overwrite replaces it: give one")
    if overwrite:
        refuse_init_in_earlier_run(out, patterns, init)
    elif not continues:  # a fresh run, or a resumed one writing into another folder
        refuse_earlier_run(out, patterns, resume_hint)
