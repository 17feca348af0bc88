"""What `finetune.py --dry_run` prints: a run's whole recipe, resolved, in words and numbers, before an
image is read."""
import math
from dataclasses import asdict

import recipes


def finetuning_plan(cfg, init: str, sizes, preset: str, size: int, counts: dict, label_names: list, taps: list) -> dict:
    """cfg: a finetune.FinetuneConfig with every open flag filled; sizes: the encoder's mrm.MRMConfig; counts:
    records per split (None where a list was not given); taps: the segmentation head's blocks."""
    classify, head, labels = cfg.task == "classify", recipes.SEG_HEADS[preset], len(label_names) or "K"
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
                 "focal 2.0 + Dice 1.0, auxiliary 0.8 + 0.4"),
        "records": counts,
        "label_names": label_names,
        "schedule": {"steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "batch_size": cfg.batch_size,
                     "lr": recipes.learning_rates(cfg),
                     "epochs": round(cfg.steps * cfg.batch_size / counts["train"], 2) if counts["train"] else None,
                     "eval_every": cfg.eval_every or "once an epoch (give the lists to count it)",
                     "validations": math.ceil(cfg.steps / cfg.eval_every) if cfg.eval_every else None,
                     "lr_schedule": "linear warm-up, then " + ("cosine to 0" if classify else "poly (power 1) to 0")},
        "optimizer": "SGD, momentum 0.9, no weight decay" if cfg.optimizer == "sgd" else
                     f"AdamW (0.9, 0.999), weight decay 0.05, layer-wise lr decay {cfg.layer_decay}",
        "augmentation": (("the whole film" if cfg.min_crop >= 1 else f"random resized crop (area {cfg.min_crop}-1)")
                         + (" + horizontal flip" if cfg.hflip else ", no flip")
                         + "; evaluation: bilinear resize, centre crop") if classify else
                        ("the whole film resized (bilinear)" + (" + horizontal flip" if cfg.hflip else ", no flip")
                         + ", no crop; evaluation: the whole film"),
        "amp": cfg.amp, "out": cfg.out, "config": asdict(cfg)}
