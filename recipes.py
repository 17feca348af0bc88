"""Every recipe number of a run, with where it comes from: the paper's pre-training (Sec. 4.6), the released
fine-tuning schedules and optimizers, this project's CPU demos; the lr schedules and optimizers built from them.
The scripts fill each flag left open (None or auto) from these tables; `--dry_run` prints what a run resolved,
`--help` where a default comes from. The model's sizes are mrm.py's (MRMConfig, PRESETS)."""
import math
from dataclasses import asdict

import torch

from machinery.errors import ConfigError

# -----------------------------------------------------------------------------
# Pre-training (train.py), by --preset. base: the paper's run (Sec. 4.6; the released run.sh and
# main_pretrain.py): batch 64 per GPU (4 GPUs: 256), base lr for batch 256, mirrored crops. tiny: a demo that
# visibly learns in minutes on a 2-core CPU (docs/pretraining.md), no mirroring (its reports name sides).

PRETRAINING = {
    "base": dict(epochs=200, warmup_epochs=40, batch_size=64, blr=1.5e-4, num_records=10000, hflip=True),
    "tiny": dict(epochs=10, warmup_epochs=1, batch_size=32, blr=1.5e-2, num_records=2048, hflip=False),
}
# AdamW (0.9, 0.95), weight decay 0.05 on matrices only (none on biases, norms and other 1-D parameters), for
# both presets: the released main_pretrain.py (MAE's).
PRETRAINING_ADAMW = dict(betas=(0.9, 0.95), weight_decay=0.05)

# -----------------------------------------------------------------------------
# Fine-tuning for classification (finetune.py --task classify): the released schedules (NIH_ChestX-ray/train.py
# and its run scripts), (warm-up steps, total steps, lr) by dataset and label %; the paper picks the lr from
# {3e-2, 3e-3, 5e-4} on validation (Sec. 4.6). The synthetic demo's: lr chosen on validation (docs/finetuning.md).

SCHEDULES = {
    ("nih", 1): (50, 3000, 3e-2), ("nih", 10): (500, 30000, 3e-3), ("nih", 100): (5000, 200000, 3e-3),
    ("chexpert", 1): (150, 2000, 3e-3), ("chexpert", 10): (1500, 60000, 5e-4), ("chexpert", 100): (15000, 200000, 5e-4),
    ("rsna", 1): (50, 2000, 3e-3), ("rsna", 10): (200, 10000, 5e-4), ("rsna", 100): (2000, 50000, 5e-4),
    ("covid", 100): (50, 1000, 3e-2), ("viral", 100): (50, 1000, 3e-2),
    **{("synthetic", r): (20, 300, 1e-4) for r in (1, 10, 100)},
}
CLASSIFY_BATCH = {"released": 96, "synthetic": 32}
# LP-FT's probe (--head_init probe): the weight decays tried, chosen on validation (docs/finetuning.md).
PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# -----------------------------------------------------------------------------
# Fine-tuning for segmentation (finetune.py --task segment), by records (released for any list of films, the
# demo's for the synthetic records) and label %: lr 2e-5, linear warm-up then poly (power 1) to 0, batch 8 (4 GPUs
# x 2), as the released Siim_Segmentation configs upernet_mrm-base_fp16_8x2_512x512_160k_siim.py (100%) and its
# _10per.py (10%); no 1% config was released (1% runs the 10% schedule), and the paper gives no step counts. The
# synthetic lines are the demo's, chosen on its validation Dice (docs/finetuning.md).

SEG_RECIPES = {
    ("released", 100): dict(warmup_steps=1500, steps=160000, lr=2e-5, batch_size=8, eval_every=500),
    ("released", 10): dict(warmup_steps=100, steps=5000, lr=2e-5, batch_size=8, eval_every=50),
    ("released", 1): dict(warmup_steps=100, steps=5000, lr=2e-5, batch_size=8, eval_every=50),
    **{("synthetic", r): dict(warmup_steps=30, steps=300, lr=3e-3, batch_size=32, eval_every=50) for r in (1, 10, 100)},
}
# The released head (upernet_mrm.py, widened in the configs above): UPerHead and an auxiliary FCN head on the
# block-8 level, their (focal, Dice) loss weights; the tiny demo keeps a third of the width, on a CPU.
SEG_HEADS = {"base": dict(channels=768, aux_channels=256), "tiny": dict(channels=64, aux_channels=64)}
SEG_LOSS_WEIGHTS = {"main": (2.0, 1.0), "aux": (0.8, 0.4)}  # (focal, Dice)

# -----------------------------------------------------------------------------
# The rest of a fine-tuning recipe, by (task, records), for the flags left at None or auto. The paper's datasets
# get the released one: classification by NIH_ChestX-ray/train.py (SGD, a near-0 head, RandomResizedCrop 0.08-1
# + flip, drop-path 0.1), segmentation by the Siim_Segmentation configs (AdamW, layer decay 0.65, flip). The
# synthetic demo gets its own, chosen on its validation split (why each: docs/finetuning.md, "The synthetic
# demo"): no flips (its reports name sides), the head first a linear probe (LP-FT), no drop-path, the whole film
# (min_crop 1, as segmentation always takes). layer_decay is MAE's 0.75 for classification with --optimizer adamw.

FINETUNING = {
    ("classify", "released"): dict(optimizer="sgd", head_init="zero", min_crop=0.08, hflip=True, drop_path=0.1,
                                   layer_decay=0.75),
    ("segment", "released"): dict(optimizer="adamw", head_init="zero", min_crop=1.0, hflip=True, drop_path=0.1,
                                  layer_decay=0.65),
    ("classify", "synthetic"): dict(optimizer="adamw", head_init="probe", min_crop=1.0, hflip=False, drop_path=0.0,
                                    layer_decay=0.75),
    ("segment", "synthetic"): dict(optimizer="adamw", head_init="zero", min_crop=1.0, hflip=False, drop_path=0.0,
                                   layer_decay=0.65),
}
SEG_INPUT_SIZE = {"base": 512}  # the released SIIM configs' 512 x 512; tiny stays at its 64 px (a CPU budget)
# The optimizers: SGD with momentum 0.9, no weight decay and gradients clipped to norm 1.0 (the released
# NIH_ChestX-ray/train.py); AdamW (0.9, 0.999), weight decay 0.05 (the released Siim_Segmentation configs).
FINETUNING_OPTIMIZERS = {"sgd": dict(momentum=0.9, weight_decay=0.0), "adamw": dict(betas=(0.9, 0.999),
                                                                                     weight_decay=0.05)}
CLIP_GRAD_NORM = 1.0  # classification only, as released


# -----------------------------------------------------------------------------
# The lr schedules, set every optimizer step


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0, then half-cycle cosine to min_lr (MAE's; pre-training and classification)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def poly_lr_at(step: int, total: int, warmup: int, lr: float, power: float = 1.0) -> float:
    """Linear warm-up, then polynomial decay to 0 (mmseg's schedule for the segmentation runs)."""
    if step < warmup:
        return lr * step / warmup
    return lr * (1 - min(step - warmup, total - warmup) / max(1, total - warmup)) ** power


# -----------------------------------------------------------------------------
# The optimizers, from the tables above


def pretraining_optimizer(model: torch.nn.Module, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (PRETRAINING_ADAMW), fused: one kernel over all parameters (4x the default on this project's 2-core
    CPU: docs/performance.md), and with fp16 its GradScaler's inf check stays on the device. The lr is set
    every step (lr_at)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=0.0, betas=PRETRAINING_ADAMW["betas"],
                             fused=device.type in ("cuda", "cpu"))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: none on biases, norms and other 1-D parameters (MAE's rule, as the
    released main_pretrain.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def finetuning_optimizer(model: torch.nn.Module, name: str, lr: float, layer_decay: float) -> torch.optim.Optimizer:
    """FINETUNING_OPTIMIZERS[name]: SGD over the trainable parameters, or AdamW with layer-wise lr decay. Each
    group's lr_scale multiplies the schedule's lr."""
    opt = FINETUNING_OPTIMIZERS[name]
    if name == "sgd":
        return torch.optim.SGD([{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}],
                               lr=lr, **opt)
    return torch.optim.AdamW(layer_decay_groups(model, opt["weight_decay"], layer_decay), lr=lr, betas=opt["betas"])


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups with layer-wise lr decay: the head at the full lr, block i of the encoder at
    decay^(depth - i), the patch embedding at decay^(depth + 1); no weight decay on 1-D parameters."""
    depth = len(model.encoder.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = depth + 1  # head
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("encoder."):
            layer = 0  # patch embedding, [CLS]
        wd = 0.0 if p.ndim == 1 or name == "encoder.cls_token" else weight_decay  # as MAE, BEiT, mmseg
        scale = decay ** (depth + 1 - layer)
        group = groups.setdefault((layer, wd), {"params": [], "weight_decay": wd, "lr_scale": scale})
        group["params"].append(p)
    return list(groups.values())


# -----------------------------------------------------------------------------
# How the scripts fill the flags left open from these tables


def fill_pretraining(cfg):
    """train.py: fill the fields left at None from the preset's line of PRETRAINING, and AdamW's weight decay."""
    if cfg.preset not in PRETRAINING:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose from {sorted(PRETRAINING)}")
    for k, v in {"weight_decay": PRETRAINING_ADAMW["weight_decay"], **PRETRAINING[cfg.preset]}.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    return cfg


def records_of(cfg) -> str:
    """Whose recipe a fine-tuning run takes: the synthetic records' (without --train_list), else the released."""
    return "synthetic" if cfg.dataset == "synthetic" and not cfg.train_list else "released"


def fill_finetuning(cfg):
    """finetune.py: fill the recipe flags left at None or auto from FINETUNING: the released recipe, or on the
    synthetic records (without --train_list) the demo's."""
    records = records_of(cfg)
    for key, value in FINETUNING[(cfg.task, records)].items():
        if getattr(cfg, key) in (None, "auto"):
            setattr(cfg, key, value)
    if cfg.task == "segment" and (cfg.head_init != "zero" or cfg.optimizer != "adamw"):
        raise ConfigError("--head_init probe and --optimizer sgd are for classification; segmentation heads start "
                          "as released and train with AdamW")
    return cfg


def fill_schedule(cfg, n_train: int | None):
    """finetune.py: fill steps, warm-up, lr, batch and validations from the schedule of (--dataset, --ratio),
    or for segmentation from SEG_RECIPES; --epochs turns into steps, the warm-up keeping its share."""
    if cfg.task == "segment":
        r = SEG_RECIPES[(records_of(cfg), cfg.ratio)]
        warmup, steps, lr, batch = r["warmup_steps"], r["steps"], r["lr"], r["batch_size"]
    else:
        schedule = SCHEDULES.get((cfg.dataset, cfg.ratio))
        if schedule is None and ((cfg.steps is None and cfg.epochs is None) or (cfg.lr is None and not cfg.lr_grid)):
            raise ConfigError(f"no released schedule for --dataset {cfg.dataset} --ratio {cfg.ratio}: "
                              "give --steps (or --epochs) and --lr (or --lr_grid)")
        warmup, steps, lr = schedule or (0, 1, None)
        batch = CLASSIFY_BATCH["synthetic" if cfg.dataset == "synthetic" else "released"]
    cfg.batch_size = cfg.batch_size or batch
    cfg.lr = cfg.lr if cfg.lr is not None else lr
    if cfg.epochs is not None:
        if n_train is None:
            raise ConfigError("--epochs needs the train list, to count an epoch's steps")
        cfg.steps = max(1, round(cfg.epochs * n_train / cfg.batch_size))
    elif cfg.steps is None:
        cfg.steps = steps
    if cfg.warmup_steps is None:
        cfg.warmup_steps = warmup if cfg.steps == steps else round(warmup / steps * cfg.steps)
    if cfg.eval_every is None:  # as released: classification once an epoch, segmentation by its config
        if cfg.task == "segment":
            every = SEG_RECIPES[(records_of(cfg), cfg.ratio)]["eval_every"]
        else:  # unknown (None) only in a --dry_run without the lists
            every = math.ceil(n_train / cfg.batch_size) if n_train else None
        cfg.eval_every = max(1, min(every, cfg.steps)) if every else None
    return cfg


def learning_rates(cfg) -> list[float]:
    """The lrs a fine-tuning run fits, one after the other: --lr_grid's, or --lr alone."""
    return [float(v) for v in cfg.lr_grid.split(",")] if cfg.lr_grid else [cfg.lr]


def pretraining_help_default(f):
    """What train.py --help shows as a flag's default: a field left at None takes the preset's recipe (or,
    outside it, what the flag's own help says)."""
    if f.name == "weight_decay":
        return PRETRAINING_ADAMW["weight_decay"]
    if f.default is not None or f.name not in PRETRAINING["base"]:
        return f.default
    return "from --preset: " + ", ".join(f"{p} {r[f.name]}" for p, r in PRETRAINING.items())


def finetuning_help_default(f) -> str:
    """What finetune.py --help shows as a flag's default: the fields left open say where their value comes from."""
    if f.name in FINETUNING[("classify", "released")]:  # e.g. "released 0.1, synthetic demo 0.0"
        parts = []
        for records in ("released", "synthetic"):
            by_task = {task: r[f.name] for (task, rec), r in FINETUNING.items() if rec == records}
            value = by_task["classify"] if len(set(by_task.values())) == 1 else \
                f"{by_task['classify']} (segmentation {by_task['segment']})"
            parts.append(f"{'released' if records == 'released' else 'synthetic demo'} {value}")
        return ", ".join(parts)
    return {"lr": "from --dataset and --ratio, their schedule (--dry_run shows it)",
            "steps": "from --dataset and --ratio", "warmup_steps": "from --dataset and --ratio",
            "batch_size": "from --dataset: 96, synthetic 32, segmentation 8 (synthetic 32)",
            "eval_every": "once an epoch; segmentation 500 at 100%, 50 at 10% and 1%, 50 for the synthetic demo",
            "epochs": "none: --steps", "image_root": "the list's folder",
            "out": "out/finetune, or out/segment with --task segment"}.get(f.name, f.default if f.default != ""
                                                                            else "none")


def finetuning_plan(cfg, init: str, sizes, preset: str, size: int, counts: dict, label_names: list, taps: list) -> dict:
    """What `finetune.py --dry_run` prints: a run's whole recipe, resolved, in words and numbers. cfg: a
    finetune.FinetuneConfig with every open flag filled; sizes: the encoder's mrm.MRMConfig; counts: records
    per split (None where a list was not given); taps: the segmentation head's blocks."""
    classify, head, labels = cfg.task == "classify", SEG_HEADS[preset], len(label_names) or "K"
    (focal, dice), (aux_focal, aux_dice), opt = *SEG_LOSS_WEIGHTS.values(), FINETUNING_OPTIMIZERS[cfg.optimizer]
    return {
        "task": cfg.task, "dataset": cfg.dataset, "ratio": cfg.ratio, "init": init,
        "encoder": {"preset": preset, "input_size": size, "patch_size": sizes.patch_size, "embed_dim": sizes.embed_dim,
                    "depth": sizes.depth, "num_heads": sizes.num_heads, "drop_path": cfg.drop_path,
                    "frozen": cfg.linear_probe},
        "head": (f"mean of the patch tokens, LayerNorm, Linear {sizes.embed_dim} -> {labels}"
                 + (", fitted first as a linear probe of the frozen features (LP-FT)" if cfg.head_init == "probe"
                    else "") if classify else
                 f"UPerNet-style head on blocks {taps}, {head['channels']} channels, dropout 0.1, one logit a pixel; "
                 f"auxiliary FCN head ({head['aux_channels']} channels) on block {taps[2]}'s level in training; loss "
                 f"focal {focal} + Dice {dice}, auxiliary {aux_focal} + {aux_dice}"),
        "records": counts, "label_names": label_names,
        "schedule": {"steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "batch_size": cfg.batch_size,
                     "lr": learning_rates(cfg),
                     "epochs": round(cfg.steps * cfg.batch_size / counts["train"], 2) if counts["train"] else None,
                     "eval_every": cfg.eval_every or "once an epoch (give the lists to count it)",
                     "validations": math.ceil(cfg.steps / cfg.eval_every) if cfg.eval_every else None,
                     "lr_schedule": "linear warm-up, then " + ("cosine to 0" if classify else "poly (power 1) to 0")},
        "optimizer": f"SGD, momentum {opt['momentum']}, weight decay {opt['weight_decay']}, gradients clipped to norm "
                     f"{CLIP_GRAD_NORM}" if cfg.optimizer == "sgd" else f"AdamW {opt['betas']}, weight decay "
                     f"{opt['weight_decay']}, layer-wise lr decay {cfg.layer_decay}",
        "augmentation": (("the whole film" if cfg.min_crop >= 1 else f"random resized crop (area {cfg.min_crop}-1)")
                         + (" + horizontal flip" if cfg.hflip else ", no flip")
                         + "; evaluation: bilinear resize, centre crop") if classify else
                        ("the whole film resized (bilinear)" + (" + horizontal flip" if cfg.hflip else ", no flip")
                         + ", no crop; evaluation: the whole film"),
        "amp": cfg.amp, "out": cfg.out, "config": asdict(cfg)}
