"""Every recipe number of a run, with where it comes from: the paper's pre-training (Sec. 4.6), the released
fine-tuning schedules, and this project's CPU demos. train.py and finetune.py fill each flag left open
(None or auto) from these tables; `--dry_run` prints what a run resolved, `--help` says which table a
default comes from. The paper's model is mrm.MRMConfig's defaults (App. A.2).
"""
import math

from machinery.errors import ConfigError

# -----------------------------------------------------------------------------
# Model sizes, by --preset (mrm.MRMConfig.from_preset): base is the paper's ViT-B/16 and its decoders; tiny
# is a CPU-sized model for the demos and tests: 128-px high-res / 64-px input, an 8 x 8 grid of 8-px patches.

PRESETS = {
    "base": {},
    "tiny": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
                 decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                 text_embed_dim=128, text_depth=2, text_num_heads=4),
}

# -----------------------------------------------------------------------------
# Pre-training (train.py), by --preset.
# base: the paper's run (Sec. 4.6; the released run.sh): 200 epochs of which 40 warm up, batch 64 per GPU
#   (4 GPUs: 256), base lr 1.5e-4 for batch 256; mirrored crops as the released main_pretrain.py.
# tiny: a demo that visibly learns in minutes on a 2-core CPU (docs/pretraining.md): a 100x higher lr for
#   its small model, 10 epochs of 2,048 synthetic records, no mirroring (its reports name sides).

PRETRAINING = {
    "base": dict(epochs=200, warmup_epochs=40, batch_size=64, blr=1.5e-4, num_records=10000, hflip=True),
    "tiny": dict(epochs=10, warmup_epochs=1, batch_size=32, blr=1.5e-2, num_records=2048, hflip=False),
}

# -----------------------------------------------------------------------------
# Fine-tuning for classification (finetune.py --task classify).
# The released schedules (NIH_ChestX-ray/train.py and its run scripts): (warm-up steps, total steps, lr) by
# dataset and label %, batch 96, SGD with momentum 0.9; the paper picks the lr from {3e-2, 3e-3, 5e-4} on
# validation (Sec. 4.6). The synthetic demo's are this project's: within 3 minutes on a 2-core CPU, lr 1e-4
# chosen on validation against 3e-5 and 3e-4 (docs/finetuning.md).

SCHEDULES = {
    ("nih", 1): (50, 3000, 3e-2), ("nih", 10): (500, 30000, 3e-3), ("nih", 100): (5000, 200000, 3e-3),
    ("chexpert", 1): (150, 2000, 3e-3), ("chexpert", 10): (1500, 60000, 5e-4),
    ("chexpert", 100): (15000, 200000, 5e-4),
    ("rsna", 1): (50, 2000, 3e-3), ("rsna", 10): (200, 10000, 5e-4), ("rsna", 100): (2000, 50000, 5e-4),
    ("covid", 100): (50, 1000, 3e-2), ("viral", 100): (50, 1000, 3e-2),
    **{("synthetic", r): (20, 300, 1e-4) for r in (1, 10, 100)},
}
CLASSIFY_BATCH = {"released": 96, "synthetic": 32}
# LP-FT's probe (--head_init probe): the weight decays tried, chosen on validation. On the demo's standardised
# features the weakest won: 1e-6 gave validation mean AUC 0.731 against 0.704 at 1e-4 (docs/finetuning.md).
PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# -----------------------------------------------------------------------------
# Fine-tuning for segmentation (finetune.py --task segment), by records (the released SIIM recipe for any list
# of films, the demo's for the synthetic records) and label %.
# AdamW lr 2e-5, weight decay 0.05, layer decay 0.65, linear warm-up then poly (power 1) to 0, batch 8 (4 GPUs
# x 2 images), as the released Siim_Segmentation configs: upernet_mrm-base_fp16_8x2_512x512_160k_siim.py
# (100%: 160k iterations, warm-up 1,500, validation every 500) and its _10per.py (10%: the 5k schedule,
# warm-up 100, validation every 50). No 1% config was released: 1% runs the 10% schedule. The paper gives
# no step counts. The synthetic lines are the demo's, chosen on its validation Dice (docs/finetuning.md).

SEG_RECIPES = {
    ("released", 100): dict(warmup_steps=1500, steps=160000, lr=2e-5, batch_size=8, eval_every=500),
    ("released", 10): dict(warmup_steps=100, steps=5000, lr=2e-5, batch_size=8, eval_every=50),
    ("released", 1): dict(warmup_steps=100, steps=5000, lr=2e-5, batch_size=8, eval_every=50),
    **{("synthetic", r): dict(warmup_steps=30, steps=300, lr=3e-3, batch_size=32, eval_every=50) for r in (1, 10, 100)},
}
# The released head (upernet_mrm.py, widened in the configs above): UPerHead of 768 channels and an auxiliary
# FCN head of 256 on the block-8 level, dropout 0.1 before each classifier, losses focal 2.0 + Dice 1.0 and
# (auxiliary) focal 0.8 + Dice 0.4. The tiny demo keeps a third of its width, 64 channels, on a CPU.
SEG_HEADS = {"base": dict(channels=768, aux_channels=256), "tiny": dict(channels=64, aux_channels=64)}
SEG_LOSS_WEIGHTS = {"main": (2.0, 1.0), "aux": (0.8, 0.4)}  # (focal, Dice)

# -----------------------------------------------------------------------------
# The rest of a fine-tuning recipe, by (task, records), for the flags left at None or auto.
# The paper's datasets get the released one: classification by NIH_ChestX-ray/train.py (SGD, a near-0 head,
# RandomResizedCrop 0.08-1 + flip, drop-path 0.1), segmentation by the Siim_Segmentation configs (AdamW,
# layer decay 0.65, flip). The synthetic demo gets this project's own, chosen on its validation split
# (docs/finetuning.md, "The synthetic demo"): its tiny encoder was pre-trained without flips (the reports
# name sides), and its pooled features differ little between films, so the head starts as a linear probe
# (LP-FT) whose large weights turn drop-path's and the crops' noise into a loss of 2 where the probe's is
# 0.46. min_crop 1 is the whole film, as segmentation always takes. layer_decay is MAE's 0.75 for
# classification, used only with --optimizer adamw.

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


# -----------------------------------------------------------------------------
# How the scripts fill the flags left open from these tables


def fill_pretraining(cfg):
    """train.py: fill the fields left at None from the preset's line of PRETRAINING."""
    if cfg.preset not in PRETRAINING:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose from {sorted(PRETRAINING)}")
    for k, v in PRETRAINING[cfg.preset].items():
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
