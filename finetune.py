"""Fine-tune the pre-trained encoder (Sec. 4.2, 4.6; the released NIH_ChestX-ray/train.py): multi-label
classification scored by ROC-AUC (NIH ChestX-ray14, CheXpert, RSNA Pneumonia, COVID-19; Tables 1-3) and
pneumothorax segmentation scored by Dice (SIIM-ACR).

    python finetune.py                                    # synthetic findings, tiny model, CPU: minutes
    python finetune.py --dataset nih --ratio 1 --init MRM.pth \\
        --splits splits/NIH_ChestX-ray --image_root NIH/images   # Table 2, 1% labels
    python finetune.py --task segment --dataset siim --ratio 10 --init MRM.pth \\
        --splits splits/SIIM-ACR_Pneumothorax --image_root siim/dicom-images-train --mask_root siim/masks

Every flag is a field of FinetuneConfig (`python finetune.py --help`). Writes to --out: results.json
(test scores of the model selected on validation), curves.png (training loss and validation score against
the step), and per learning rate lr_<lr>/log.jsonl, lr_<lr>/best.pt (the selected weights) and
lr_<lr>/last.pt (to continue with --resume). One process, as the paper's
classification runs (one GPU); mixed precision on a GPU.
"""
import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import checks
import curves
import data
import synthetic
from checkpoints import (CheckpointError, checked_model_config, load_pretrained, load_summary, non_finite,
                         read_checkpoint, save_checkpoint)
from checks import auc_table, dice_per_image, mean_auc, roc_auc
from data import bounded
from finetune_data import LABEL_NAMES, FinetuneDataset, StepSampler, build_splits, label_subset, resolve_lists
from mrm import ConfigError, MRMConfig, ViT
from train import NonFiniteLoss, amp_dtype, config_parser, lr_at

# Released classification schedules: (warm-up steps, total steps, lr) by dataset and label %, batch 96.
SCHEDULES = {
    ("nih", 1): (50, 3000, 3e-2), ("nih", 10): (500, 30000, 3e-3), ("nih", 100): (5000, 200000, 3e-3),
    ("chexpert", 1): (150, 2000, 3e-3), ("chexpert", 10): (1500, 60000, 5e-4),
    ("chexpert", 100): (15000, 200000, 5e-4),
    ("rsna", 1): (50, 2000, 3e-3), ("rsna", 10): (200, 10000, 5e-4), ("rsna", 100): (2000, 50000, 5e-4),
    ("covid", 100): (50, 1000, 3e-2), ("viral", 100): (50, 1000, 3e-2),
    # ours: the synthetic demo (tiny encoder, batch 32, AdamW: RECIPES below), within 3 minutes on a 2-core CPU;
    # lr 1e-4 chosen on validation against 3e-5 and 3e-4 (docs/finetuning.md)
    **{("synthetic", r): (20, 300, 1e-4) for r in (1, 10, 100)},
}
CLASSIFY_BATCH = 96
# LP-FT's probe: the weight decays tried (chosen on validation). On the demo's standardised features the
# weakest won: 1e-6 gave validation mean AUC 0.731 against 0.704 at 1e-4 (docs/finetuning.md).
PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
LOG_EVERY = 10  # steps between training-loss lines of log.jsonl (validations add their own)
# Segmentation: AdamW lr 2e-5, weight decay 0.05, layer decay 0.65, linear warm-up then poly (power 1) to 0,
# batch 8 (4 GPUs x 2 images), as the released Siim_Segmentation configs: upernet_mrm-base_fp16_8x2_512x512_
# 160k_siim.py (100%: 160k iterations, warm-up 1,500, validation every 500) and its _10per.py (10%: the 5k
# schedule, warm-up 100, validation every 50). No 1% config was released: 1% runs the 10% schedule. The
# paper gives no step counts. The tiny preset's lines are the synthetic demo's, chosen on its validation
# Dice (docs/finetuning.md).
SEG_RECIPES = {
    ("base", 100): dict(warmup_steps=1500, steps=160000, lr=2e-5, batch_size=8, eval_every=500),
    ("base", 10): dict(warmup_steps=100, steps=5000, lr=2e-5, batch_size=8, eval_every=50),
    ("base", 1): dict(warmup_steps=100, steps=5000, lr=2e-5, batch_size=8, eval_every=50),
    **{("tiny", r): dict(warmup_steps=30, steps=300, lr=3e-3, batch_size=32, eval_every=50) for r in (1, 10, 100)},
}
# The released head (upernet_mrm.py, widened in the configs above): UPerHead of 768 channels and an auxiliary
# FCN head of 256 on the block-8 level, dropout 0.1 before each classifier, losses focal 2.0 + Dice 1.0 and
# (auxiliary) focal 0.8 + Dice 0.4. The tiny demo keeps a third of its width, 64 channels, on a CPU.
SEG_HEADS = {"base": dict(channels=768, aux_channels=256), "tiny": dict(channels=64, aux_channels=64)}
SEG_LOSS_WEIGHTS = {"main": (2.0, 1.0), "aux": (0.8, 0.4)}  # (focal, Dice)
# The rest of the recipe, for the flags left at None or auto. The paper's datasets get the released one:
# classification by NIH_ChestX-ray/train.py (SGD, a near-0 head, RandomResizedCrop 0.08-1 + flip, drop-path
# 0.1), segmentation by the Siim_Segmentation configs (AdamW, layer decay 0.65, flip). The synthetic demo
# gets this project's own, chosen on its validation split (docs/finetuning.md, "The synthetic demo"): its
# tiny encoder was pre-trained without flips (the reports name sides), and its pooled features differ
# little between films, so the head starts as a linear probe (LP-FT) whose large weights turn drop-path's
# and the crops' noise into a loss of 2 where the probe's is 0.46.
RECIPES = {  # (task, records): the flags' values; min_crop 1 is the whole film, as segmentation always takes
    ("classify", "released"): dict(optimizer="sgd", head_init="zero", min_crop=0.08, hflip=True, drop_path=0.1,
                                   layer_decay=0.75),  # (layer decay: MAE's, used only with --optimizer adamw)
    ("segment", "released"): dict(optimizer="adamw", head_init="zero", min_crop=1.0, hflip=True, drop_path=0.1,
                                  layer_decay=0.65),
    ("classify", "synthetic"): dict(optimizer="adamw", head_init="probe", min_crop=1.0, hflip=False, drop_path=0.0,
                                    layer_decay=0.75),
    ("segment", "synthetic"): dict(optimizer="adamw", head_init="zero", min_crop=1.0, hflip=False, drop_path=0.0,
                                   layer_decay=0.65),
}


@dataclass
class FinetuneConfig:
    # what to learn
    task: str = "classify"           # classify (ROC-AUC) or segment (Dice)
    dataset: str = "synthetic"       # synthetic, nih, chexpert, rsna, covid, viral, siim, or custom (labels l1..lK)
    ratio: int = 100                 # label % (1, 10, 100): its released schedule, and with --splits its train list
    splits: str = ""                 # folder of released lists: train_1/train_10/train_list by --ratio, val, test
    train_list: str = ""             # lines 'relative/path l1 ... lK' (segmentation: image ids)
    val_list: str = ""
    test_list: str = ""
    image_root: str = ""             # folder the list paths are relative to
    mask_root: str = ""              # segmentation: <id>.png masks, e.g. from `python prepare.py siim-masks`
    label_fraction: float = 1.0      # train on a seeded random subset of the train list (datasets without 1%/10% lists)
    num_records: int = 2000          # synthetic: training records (all synthetic splits are unseen in pre-training)
    num_val: int = 500               # synthetic: validation records
    num_test: int = 1000             # synthetic: test records
    seg_findings: str = "pneumothorax"  # synthetic segmentation: findings whose masks are the target, comma-separated
    # model
    init: str = "auto"               # ours (train.py), MAE's or MRM.pth; none: scratch; auto: out/ckpt.pt if there
    trust_checkpoint: bool = False   # load --init even if it pickles more than weights (runs its code)
    preset: str = "auto"             # tiny or base; auto: the checkpoint's own sizes, else base (tiny for synthetic)
    input_size: int = 0              # 0: the encoder's pre-training size; 512 for segmentation with the base encoder
    drop_path: float | None = None   # stochastic depth of the encoder
    min_crop: float | None = None    # classification: smallest area share of a training crop
    hflip: bool | None = None        # mirror half the training views
    linear_probe: bool = False       # freeze the encoder, train the new norm and head only
    head_init: str = "auto"          # classification head: zero (near 0) or probe (LP-FT: a linear probe first)
    optimizer: str = "auto"          # classification: sgd or adamw (segmentation: always adamw)
    layer_decay: float | None = None  # adamw: block i's lr scaled by layer_decay^(depth - i)
    # optimisation (None: from the schedule of --dataset and --ratio)
    lr: float | None = None          # peak learning rate, reached after the warm-up
    lr_grid: str = ""                # comma-separated lrs (e.g. 3e-2,3e-3,5e-4): run each, keep the best on validation
    steps: int | None = None         # optimizer steps
    warmup_steps: int | None = None  # steps of linear warm-up from 0
    epochs: float | None = None      # instead of --steps: passes over the train list (warm-up scaled alike)
    batch_size: int | None = None    # images a step
    eval_every: int | None = None    # steps between validations
    dry_run: bool = False            # print the resolved settings as one JSON object and stop, before reading an image
    amp: str = "auto"                # auto (bf16 where the GPU has it, else fp16; off on CPU), bf16, fp16, off
    num_workers: int = 2             # data loading processes
    out: str = ""                    # results.json and lr_<lr>/; empty: out/finetune, or out/segment for --task segment
    resume: bool = False             # continue each lr's run from its last.pt in --out
    overwrite: bool = False          # replace an earlier run found in --out (without it, such an --out is refused)
    seed: int = 0                    # init of the new layers, data order, crops, label subset


# -----------------------------------------------------------------------------
# Models: the encoder plus a classification head or a segmentation head


class Classifier(nn.Module):
    """Encoder, mean of the patch tokens, new LayerNorm (fc_norm), Linear head (the released models_vit.py)."""

    def __init__(self, encoder: ViT, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.encoder.norm.requires_grad_(False)  # unused: pooling comes first, then fc_norm (MAE's global pool)
        dim = encoder.cls_token.shape[-1]
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_labels)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # near 0: every label starts at p = 0.5
        nn.init.zeros_(self.head.bias)

    def features(self, x):  # x: (B, 3, S, S) normalised -> what the head reads (B, D)
        tokens = self.encoder.hidden_states(x, [len(self.encoder.blocks)])[-1]  # (B, 1 + L, D)
        return self.fc_norm(tokens[:, 1:].mean(dim=1))

    def forward(self, x):  # -> logits (B, K)
        return self.head(self.features(x))


def conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Segmenter(nn.Module):
    """ViT tokens after blocks 4, 6, 8, 12 (a third, half, two thirds and all of the depth) -> a pyramid at
    x4, x2, x1, x0.5 of the patch grid -> a light UPerNet head (lateral convs, top-down fusion, pyramid
    pooling on the coarsest level) -> one logit per pixel at the input size (the released upernet_mrm.py)."""

    def __init__(self, encoder: ViT, channels: int | None = None, aux_channels: int | None = None,
                 pool_scales=(1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.encoder.norm.requires_grad_(False)  # unused: the taps are taken before it
        d, depth = encoder.cls_token.shape[-1], len(encoder.blocks)
        c = channels or d // 3
        self.taps = self.tap_blocks(depth)
        up = lambda: nn.ConvTranspose2d(d, d, kernel_size=2, stride=2)  # noqa: E731
        self.rescale = nn.ModuleList([nn.Sequential(up(), nn.BatchNorm2d(d), nn.GELU(), up()),  # x4
                                      up(), nn.Identity(), nn.MaxPool2d(2)])  # x2, x1, x0.5
        self.lateral = nn.ModuleList([conv_bn_relu(d, c, 1) for _ in range(3)])
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(d, c, 1)) for s in pool_scales])
        self.ppm_out = conv_bn_relu(d + len(pool_scales) * c, c, 3)
        self.fpn = nn.ModuleList([conv_bn_relu(c, c, 3) for _ in range(3)])
        self.fuse = conv_bn_relu(4 * c, c, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(c, 1, 1)
        # auxiliary FCN head on the third tap's level (block 8 of 12: x1 of the grid), used in training only
        self.aux = nn.Sequential(conv_bn_relu(d, aux_channels or c, 3), nn.Dropout2d(dropout),
                                 nn.Conv2d(aux_channels or c, 1, 1))

    @staticmethod
    def tap_blocks(depth: int) -> list[int]:
        return [depth // 3, depth // 2, 2 * depth // 3, depth]

    def forward(self, x):
        """x: (B, 3, S, S) normalised -> logits (B, 1, S, S); in training also the auxiliary head's."""
        g = self.encoder.grid_size
        grids = [t[:, 1:].transpose(1, 2).unflatten(2, (g, g)) for t in self.encoder.hidden_states(x, self.taps)]
        pyramid = [r(t) for r, t in zip(self.rescale, grids)]  # (B, D, 4g), (B, D, 2g), (B, D, g), (B, D, g/2)
        top = pyramid[3]
        pooled = [F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for p in self.ppm]
        levels = [lat(p) for lat, p in zip(self.lateral, pyramid[:3])] + [self.ppm_out(torch.cat([top] + pooled, 1))]
        for i in (3, 2, 1):  # top-down: each level gains the coarser one's context
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear",
                                                          align_corners=False)
        outs = [conv(lv) for conv, lv in zip(self.fpn, levels[:3])] + [levels[3]]
        size = outs[0].shape[-2:]  # 4g: a quarter of the input
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        logits = self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))  # (B, 1, 4g, 4g)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        aux = F.interpolate(self.aux(pyramid[2]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, aux


def focal_loss(logits, target, gamma: float = 2.0, alpha: float = 0.5):
    """Binary focal loss, mean over pixels: easy background pixels weigh little. gamma 2 and alpha 0.5 are
    mmseg's FocalLoss defaults, which the released configs use (RetinaNet's alpha is 0.25)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_true = p * target + (1 - p) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * (1 - p_true) ** gamma * ce).mean()


def dice_loss(logits, target, smooth: float = 1.0):
    """1 - soft Dice per image, averaged: the overlap term the metric rewards."""
    p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def layer_decay_groups(model: nn.Module, weight_decay: float, decay: float) -> list[dict]:
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


def poly_lr_at(step: int, total: int, warmup: int, lr: float, power: float = 1.0) -> float:
    """Linear warm-up, then polynomial decay to 0 (mmseg's schedule for the segmentation runs)."""
    if step < warmup:
        return lr * step / warmup
    return lr * (1 - min(step - warmup, total - warmup) / max(1, total - warmup)) ** power


# -----------------------------------------------------------------------------
# Putting a run together


def resolve_recipe(cfg: FinetuneConfig) -> FinetuneConfig:
    """Fill the recipe flags left at None or auto from RECIPES: the released recipe, or on the synthetic
    records (without --train_list) the demo's."""
    records = "synthetic" if cfg.dataset == "synthetic" and not cfg.train_list else "released"
    for key, value in RECIPES[(cfg.task, records)].items():
        if getattr(cfg, key) in (None, "auto"):
            setattr(cfg, key, value)
    if cfg.task == "segment" and (cfg.head_init != "zero" or cfg.optimizer != "adamw"):
        raise ConfigError("--head_init probe and --optimizer sgd are for classification; segmentation heads start "
                          "as released and train with AdamW")
    return cfg


def resolve_schedule(cfg: FinetuneConfig, preset: str, n_train: int | None) -> FinetuneConfig:
    """Fill steps, warm-up, lr and batch from the released schedule of (--dataset, --ratio), or for
    segmentation from SEG_RECIPES; --epochs turns into steps, the warm-up keeping its share."""
    if cfg.task == "segment":
        r = SEG_RECIPES[(preset, cfg.ratio)]
        warmup, steps, lr, batch = r["warmup_steps"], r["steps"], r["lr"], r["batch_size"]
    else:
        schedule = SCHEDULES.get((cfg.dataset, cfg.ratio))
        if schedule is None and ((cfg.steps is None and cfg.epochs is None) or (cfg.lr is None and not cfg.lr_grid)):
            raise ConfigError(f"no released schedule for --dataset {cfg.dataset} --ratio {cfg.ratio}: "
                             "give --steps (or --epochs) and --lr (or --lr_grid)")
        warmup, steps, lr = schedule or (0, 1, None)
        batch = 32 if cfg.dataset == "synthetic" else CLASSIFY_BATCH
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
            every = SEG_RECIPES[(preset, cfg.ratio)]["eval_every"]
        else:  # unknown (None) only in a --dry_run without the lists
            every = math.ceil(n_train / cfg.batch_size) if n_train else None
        cfg.eval_every = max(1, min(every, cfg.steps)) if every else None
    return cfg


def resolve_encoder(cfg: FinetuneConfig) -> tuple[str, MRMConfig, str, int]:
    """(init, encoder sizes, preset name, input size): the checkpoint, its sizes, and the fine-tuning input.
    Classification runs at the pre-training input; segmentation at 512 for the base encoder (the released
    SIIM configs' 512 x 512), while the tiny demo stays at its 64 px (a CPU budget; tests cover the
    position-table interpolation)."""
    init = pick_init(cfg)
    sizes = encoder_sizes(cfg, init)
    preset = "base" if sizes.embed_dim == MRMConfig().embed_dim else "tiny"
    size = cfg.input_size or (512 if cfg.task == "segment" and preset == "base" else sizes.img_size)
    if size % sizes.patch_size:
        raise ConfigError(f"--input_size {size} is not a multiple of the patch size {sizes.patch_size}")
    return init, sizes, preset, size


def pick_init(cfg: FinetuneConfig) -> str:
    if cfg.init == "auto":
        default = "out/ckpt.pt"
        if os.path.exists(default):
            return default
        print(f"no {default} (from `python train.py`): fine-tuning from scratch; --init PATH picks weights")
        return "none"
    return cfg.init


def encoder_sizes(cfg: FinetuneConfig, init: str) -> MRMConfig:
    """The encoder's sizes: from this project's checkpoint (it records them), else the preset."""
    if init != "none":
        ckpt = read_checkpoint(init, cfg.trust_checkpoint)  # refuses a missing, broken or unsafe file, naming it
        if isinstance(ckpt, dict) and isinstance(ckpt.get("model_config"), dict):
            sizes = checked_model_config(init, ckpt["model_config"], cfg.trust_checkpoint)  # sizes in range
            if cfg.preset not in ("auto", "") and MRMConfig.from_preset(cfg.preset).embed_dim != sizes.embed_dim:
                raise CheckpointError(f"{init}: holds a {sizes.embed_dim}-wide encoder, not --preset {cfg.preset}")
            return sizes
    preset = cfg.preset if cfg.preset not in ("auto", "") else "tiny" if cfg.dataset == "synthetic" else "base"
    return MRMConfig.from_preset(preset)


def build_model(cfg: FinetuneConfig, sizes: MRMConfig, init: str, num_labels: int, size: int, verbose=True):
    """The encoder at input `size` (its position table interpolated from the checkpoint's if the size
    differs), loaded from `init`, under a new classification or segmentation head."""
    encoder = ViT(size, sizes.patch_size, sizes.in_chans, sizes.embed_dim, sizes.depth, sizes.num_heads,
                  sizes.mlp_ratio, drop_path_rate=cfg.drop_path)
    if init != "none":
        report = load_pretrained(encoder, init, verbose=False, trust=cfg.trust_checkpoint)
        if verbose:
            print(load_summary(report, len(encoder.state_dict()), init))
    model = Classifier(encoder, num_labels) if cfg.task == "classify" else \
        Segmenter(encoder, **SEG_HEADS["base" if sizes.embed_dim == MRMConfig().embed_dim else "tiny"])
    if cfg.linear_probe:
        encoder.requires_grad_(False)
    return model


def to_input(images: torch.Tensor, device, sizes: MRMConfig) -> torch.Tensor:
    """(B, 1, S, S) uint8 -> (B, 3, S, S) normalised floats, on the device (the loader ships bytes)."""
    x = images.to(device, non_blocking=True).float().div_(255)
    return ((x - sizes.pixel_mean) / sizes.pixel_std).expand(-1, sizes.in_chans, -1, -1)


@torch.no_grad()
def evaluate(model, dataset: FinetuneDataset, cfg: FinetuneConfig, sizes: MRMConfig, device, dtype, desc: str):
    """Classification: (AUC per label (K,), scores (N, K)); segmentation: (Dice per image (N,), whether
    each image's truth holds the finding (N,))."""
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    model.eval()  # the caller sets its training mode again
    scores, truths = [], []
    for batch in data.progress(loader, desc=desc):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(to_input(batch["image"], device, sizes)).float()
        target = batch["target"].numpy()
        if cfg.task == "classify":
            scores.append(torch.sigmoid(logits).cpu().numpy())
            truths.append(target)
        else:  # a pixel is the finding where its logit is above 0 (p > 0.5)
            scores.append(dice_per_image((logits[:, 0] > 0).cpu().numpy(), target))
            truths.append(target.reshape(len(target), -1).any(1))
    scores, truths = np.concatenate(scores), np.concatenate(truths)
    if cfg.task == "classify":
        return roc_auc(truths, scores), scores
    return scores, truths


@torch.no_grad()
def head_inputs(model: Classifier, dataset: FinetuneDataset, cfg: FinetuneConfig, sizes: MRMConfig, device, dtype):
    """(N, D): what the head reads, fc_norm(mean patch token), for every record's test view."""
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    model.eval()  # the caller sets its training mode again
    out = []
    for batch in data.progress(loader, desc="features for the probe"):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out.append(model.features(to_input(batch["image"], device, sizes)).float().cpu())
    return torch.cat(out)


def fit_head_to_probe(model: Classifier, datasets: dict, cfg: FinetuneConfig, sizes: MRMConfig, device, dtype,
                      weight_decays=None) -> dict:
    """LP-FT (Kumar et al., 2022, "Fine-tuning can distort pretrained features"): before any step, set the
    head to a logistic regression fitted to convergence on the frozen encoder's features of the training
    records' test views, without augmentation (weight decay chosen on validation mean AUC), so fine-tuning
    starts where a linear probe ends instead of from a head near 0 that a short schedule never finishes
    training. The features are standardised for the fit (checks.linear_probe) and the standardisation
    folded into the head, which stays one Linear."""
    splits = ("train", "val")
    probe = checks.linear_probe({k: head_inputs(model, datasets[k], cfg, sizes, device, dtype) for k in splits},
                                {k: datasets[k].labels for k in splits}, weight_decays or PROBE_WEIGHT_DECAYS)
    w, mean, std = probe["w"], probe["mean"], probe["std"]
    with torch.no_grad():  # head(f) = ((f - mean) / std) @ w + b
        model.head.weight.copy_((w / std[:, None]).T)
        model.head.bias.copy_(probe["b"] - (mean / std) @ w)
    print(f"head fitted to a probe of the frozen features (weight decay {probe['weight_decay']:g}): "
          f"validation mean AUC {probe['val_auc_mean']:.4f} before fine-tuning")
    return {"val": probe["val_auc_mean"], "weight_decay": probe["weight_decay"]}


def learning_rates(cfg: FinetuneConfig) -> list[float]:
    """The lrs a run fits, one after the other: --lr_grid's, or --lr alone."""
    return [float(v) for v in cfg.lr_grid.split(",")] if cfg.lr_grid else [cfg.lr]


def draw_curves(cfg: FinetuneConfig):
    """--out/curves.png: training loss and validation score against the step, a line per lr of the grid."""
    lrs = learning_rates(cfg)
    metric = "val_auc_mean" if cfg.task == "classify" else "val_dice"
    curves.finetuning_curves({f"{lr:g}": os.path.join(cfg.out, f"lr_{lr:g}", "log.jsonl") for lr in lrs},
                             os.path.join(cfg.out, "curves.png"), metric,
                             f"fine-tuning on {cfg.dataset} ({cfg.task}, {cfg.ratio}% labels)")


def random_encoder_probe(cfg: FinetuneConfig, datasets: dict, sizes: MRMConfig, size: int, device, dtype) -> float:
    """Test mean AUC of a linear probe of a randomly initialised encoder (the seed's), fitted as LP-FT fits
    the head: the score a scratch run starts from, printed beside the synthetic demo's result."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, sizes, "none", datasets["train"].labels.shape[1], size).to(device)
    splits = ("train", "val", "test")
    probe = checks.linear_probe({k: head_inputs(model, datasets[k], cfg, sizes, device, dtype) for k in splits},
                                {k: datasets[k].labels for k in splits}, PROBE_WEIGHT_DECAYS)
    return probe["test_auc_mean"]


def summary(values: np.ndarray, names, cfg: FinetuneConfig, split: str) -> float:
    """The one number a run is judged by: mean AUC over labels, or mean Dice over images."""
    return mean_auc(values, names, split) if cfg.task == "classify" else float(values.mean())


RESUME_MAY_CHANGE = {"resume", "num_workers", "amp", "eval_every", "trust_checkpoint", "dry_run"}


def default_out(cfg: FinetuneConfig) -> str:
    """--out, or where the task's demo writes: the two demos write apart, so that `python finetune.py --task
    segment` after `python finetune.py` does not find the first one's run in its folder."""
    return cfg.out or os.path.join("out", "finetune" if cfg.task == "classify" else "segment")


def check_settings(cfg: FinetuneConfig):
    """What the flags' own limits (LIMITS) cannot tell, refused before anything is read: a bad lr grid, an
    --out that is a file, and an --out that holds an earlier run (never emptied without --resume or
    --overwrite)."""
    for v in cfg.lr_grid.split(",") if cfg.lr_grid else []:
        try:
            ok = math.isfinite(float(v)) and float(v) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--lr_grid {cfg.lr_grid}: {v!r} is not a positive number")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ConfigError(f"--out {cfg.out} is a file, not a folder")
    if cfg.resume or cfg.overwrite or not os.path.isdir(cfg.out):
        return
    earlier = sorted(os.path.relpath(os.path.join(d, f), cfg.out) for d, _, files in os.walk(cfg.out) for f in files
                     if f in ("results.json", "log.jsonl", "best.pt", "last.pt"))
    if earlier:
        raise ConfigError(f"--out {cfg.out} holds an earlier run ({', '.join(earlier[:3])}"
                          f"{', ...' if len(earlier) > 3 else ''}): pass --resume to continue it, --overwrite to "
                          "replace it, or another --out")


def fit(cfg: FinetuneConfig, lr: float, run_dir: str, datasets: dict, names, sizes: MRMConfig, init: str,
        device, dtype) -> dict:
    """Fine-tune at one learning rate; keep the weights with the best validation score in run_dir/best.pt.
    Returns {'lr', 'val', 'step', 'checkpoint'}."""
    os.makedirs(run_dir, exist_ok=True)
    best_path, last_path, log_path = (os.path.join(run_dir, f) for f in ("best.pt", "last.pt", "log.jsonl"))
    classify = cfg.task == "classify"
    torch.manual_seed(cfg.seed)  # the new head's init, drop-path
    model = build_model(cfg, sizes, init, len(names), datasets["train"].size).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":  # the released NIH_ChestX-ray/train.py: SGD, momentum 0.9, no weight decay
        optimizer = torch.optim.SGD([{"params": params, "lr_scale": 1.0}], lr=lr, momentum=0.9, weight_decay=0.0)
    else:  # AdamW, weight decay 0.05, layer-wise lr decay (the released segmentation's 0.65)
        optimizer = torch.optim.AdamW(layer_decay_groups(model, 0.05, cfg.layer_decay), lr=lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    config = {**asdict(cfg), "lr": lr}
    step, best = 0, {"lr": lr, "val": -math.inf, "step": 0, "checkpoint": best_path}
    resumed = cfg.resume and os.path.exists(last_path)
    if resumed:
        state = read_checkpoint(last_path, expect=dict(model=dict, optimizer=dict, scaler=dict, step=int, best=dict,
                                                       config=dict, rng=torch.Tensor))
        default = asdict(FinetuneConfig())  # a flag newer than the checkpoint had its default then
        changed = sorted(k for k in config if k not in RESUME_MAY_CHANGE
                         and state["config"].get(k, default.get(k)) != config[k])
        if changed:
            raise ConfigError(f"{last_path}: --resume continues the same run; changed: "
                             + ", ".join(f"{k} {state['config'].get(k)!r} -> {config[k]!r}" for k in changed))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state["scaler"]:  # empty when the stopped run had no fp16 scaler
            scaler.load_state_dict(state["scaler"])
        step, best = state["step"], state["best"]
        print(f"{last_path}: resuming at step {step}/{cfg.steps}")
        if os.path.exists(log_path):  # drop what the stopped run logged after this checkpoint
            kept = [line for line in open(log_path) if json.loads(line)["step"] <= step]
            with open(log_path, "w") as f:
                f.writelines(kept)
    elif os.path.exists(log_path):
        os.remove(log_path)
    if step >= cfg.steps:
        return best

    train_set = datasets["train"]
    loader = DataLoader(train_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        sampler=StepSampler(len(train_set), cfg.batch_size, cfg.steps, cfg.seed, start_step=step),
                        pin_memory=device.type == "cuda")
    batches = iter(loader)  # draws a seed from torch's generator: before the saved state is put back
    if resumed:
        torch.set_rng_state(state["rng"])  # drop-path continues where the stopped run left it
        if device.type == "cuda" and state.get("cuda_rng") is not None:  # on a GPU drop-path draws from CUDA's
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    schedule = lr_at if classify else poly_lr_at  # cosine (classification), polynomial (segmentation)

    def train_mode():
        model.train()
        if cfg.linear_probe:
            model.encoder.eval()  # frozen: no drop-path either

    def validate(train_loss):
        """Score the validation split, keep the best weights and the state to resume from, log one line."""
        broken = non_finite(model.state_dict())
        if broken:  # the loss came before the last update: what is saved is checked itself
            raise NonFiniteLoss(f"after step {step} at lr {lr:g}, {len(broken)} weight tensors are not finite (e.g. "
                                f"{broken[0]}); stopping. {best_path} and {last_path} are left as they were: "
                                "lower the lr, or --amp off")
        values, _ = evaluate(model, datasets["val"], cfg, sizes, device, dtype, "validation")
        train_mode()
        val = summary(values, names, cfg, "validation")
        if val > best["val"]:
            best.update(val=val, step=step)
            save_checkpoint(best_path, {"model": model.state_dict(), "step": step, "val": val, "config": config,
                                        "model_config": sizes.to_dict(), "labels": list(names)})
        save_checkpoint(last_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scaler": scaler.state_dict(), "step": step, "best": best, "config": config,
                                    "rng": torch.get_rng_state(),
                                    "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None})
        record = {"step": step, "lr": optimizer.param_groups[-1]["lr"], "train_loss": train_loss,
                  ("val_auc_mean" if classify else "val_dice"): val}
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        draw_curves(cfg)
        return val

    if not resumed and classify and cfg.head_init == "probe":
        # LP-FT: the head starts as a linear probe, and that start is a candidate for the kept weights, so
        # the selected model is never below the probe on validation
        fit_head_to_probe(model, datasets, cfg, sizes, device, dtype)
        validate(None)
    train_mode()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"lr {lr:g}", leave=False, dynamic_ncols=True, disable=None)
    loss_sum, loss_steps = torch.zeros((), device=device), 0  # since the last validation
    recent = []  # since the last training-loss line of log.jsonl or the last validation
    for batch in batches:
        for group in optimizer.param_groups:
            group["lr"] = schedule(step, cfg.steps, cfg.warmup_steps, lr) * group["lr_scale"]
        x, target = to_input(batch["image"], device, sizes), batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        if classify:  # BCE-with-logits per label, in fp32
            loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        else:  # focal + Dice (Sec. 4.6) on the main and the auxiliary head, weighted as released
            mask = target[:, None].float()
            loss = sum(wf * focal_loss(out.float(), mask) + wd * dice_loss(out.float(), mask)
                       for out, (wf, wd) in zip(logits, SEG_LOSS_WEIGHTS.values()))
        scaler.scale(loss).backward()
        if classify:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum += loss.detach()
        loss_steps += 1
        recent.append(loss.detach())
        bar.update()
        if step % LOG_EVERY == 0:  # the curve's points: the mean loss since the last point or validation
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "lr": optimizer.param_groups[-1]["lr"],
                                    "train_loss": torch.stack(recent).mean().item()}) + "\n")
            recent = []
        if step % cfg.eval_every and step != cfg.steps:
            continue
        # a validation (with the loss lines above, the loop's only host syncs); a resumed run starts here
        recent = []
        train_loss = loss_sum.item() / loss_steps
        loss_sum.zero_()
        loss_steps = 0
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"the loss is {train_loss} before step {step} at lr {lr:g}; stopping. "
                                f"{best_path} and {last_path} are left as they were: lower the lr, or --amp off")
        val = validate(train_loss)
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val:.4f}", best=f"{best['val']:.4f}")
    bar.close()
    print(f"lr {lr:g}: best validation {'mean AUC' if classify else 'Dice'} {best['val']:.4f} at step {best['step']}")
    return best


def run(cfg: FinetuneConfig, rendered: dict | None = None) -> dict:
    """Fine-tune at each lr of the grid, select on validation, score the test split once. Returns results.
    rendered: see build_splits."""
    cfg.out = default_out(cfg)
    check_settings(cfg)
    cfg = resolve_recipe(resolve_lists(cfg))
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = amp_dtype(cfg, device)
    init, sizes, preset, size = resolve_encoder(cfg)
    datasets, names = build_splits(cfg, size, rendered)
    cfg = resolve_schedule(cfg, preset, len(datasets["train"]))
    lrs = learning_rates(cfg)
    print(f"fine-tuning ({cfg.task}) {preset} encoder from {init} at {size} px on {cfg.dataset}: "
          f"{len(datasets['train'])} train / {len(datasets['val'])} val / {len(datasets['test'])} test, "
          f"{cfg.steps} steps of {cfg.batch_size} (warm-up {cfg.warmup_steps}), lr {lrs}, device {device}"
          f"{'' if dtype is None else ' ' + str(dtype).split('.')[-1]}")
    os.makedirs(cfg.out, exist_ok=True)
    runs = [fit(cfg, lr, os.path.join(cfg.out, f"lr_{lr:g}"), datasets, names, sizes, init, device, dtype)
            for lr in lrs]
    chosen = max(runs, key=lambda r: r["val"])  # selected on validation only

    # the test split, scored once, with the selected weights
    model = build_model(cfg, sizes, "none", len(names), size).to(device)
    model.load_state_dict(read_checkpoint(chosen["checkpoint"])["model"])
    values, extra = evaluate(model, datasets["test"], cfg, sizes, device, dtype, "test")
    test = summary(values, names, cfg, "test")
    results = {"task": cfg.task, "dataset": cfg.dataset, "init": init, "selected_lr": chosen["lr"],
               "best_step": chosen["step"], "checkpoint": chosen["checkpoint"],
               "val_by_lr": {f"{r['lr']:g}": r["val"] for r in runs},
               "sizes": {k: len(d) for k, d in datasets.items()}, "config": asdict(cfg)}
    clean = lambda v: None if np.isnan(v) else float(v)  # noqa: E731 (JSON has no NaN)
    if cfg.task == "classify":
        results.update(val_auc_mean=chosen["val"], test_auc={n: clean(v) for n, v in zip(names, values)},
                       test_auc_mean=clean(test))
        print(auc_table([*names, "mean"], [*values, test], f"test ({len(datasets['test'])} images)"))
        if cfg.dataset == "synthetic" and not cfg.train_list and init != "none":
            results["random_encoder_probe_test_auc_mean"] = scratch = random_encoder_probe(cfg, datasets, sizes,
                                                                                          size, device, dtype)
            print(f"for scale, a linear probe of a random encoder (where `--init none` starts): test mean AUC "
                  f"{scratch:.4f}; this run {test:.4f}: the pre-trained start is "
                  f"{'better' if test > scratch else 'worse'} than scratch here")
    else:
        # an empty prediction everywhere scores the share of empty truths: the two parts tell them apart
        with_finding = clean(values[extra].mean()) if extra.any() else None
        results.update(val_dice=chosen["val"], test_dice=test, test_dice_with_finding=with_finding,
                       test_dice_without_finding=clean(values[~extra].mean()) if (~extra).any() else None,
                       test_share_without_finding=float((~extra).mean()))
        shown = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"test Dice {shown(with_finding)} on the {int(extra.sum())} images with the finding, "
              f"{shown(results['test_dice_without_finding'])} on the {int((~extra).sum())} without; "
              f"the SIIM-rule mean over all {len(values)}: {test:.4f}")
    path = os.path.join(cfg.out, "results.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(f"{path}.tmp", path)
    print(f"selected lr {chosen['lr']:g} (step {chosen['step']}); results in {path}")
    return results


# -----------------------------------------------------------------------------
# Command line: the flags are FinetuneConfig's fields


def plan(cfg: FinetuneConfig) -> dict:
    """--dry_run: every setting run() would use, resolved the same way, without reading an image. The split
    lists are counted (lines and labels), not checked against the images."""
    cfg = resolve_recipe(resolve_lists(FinetuneConfig(**asdict(cfg))))
    init, sizes, preset, size = resolve_encoder(cfg)
    if cfg.dataset == "synthetic" and not cfg.train_list:
        counts = {"train": cfg.num_records, "val": cfg.num_val, "test": cfg.num_test}
        labels = 1 if cfg.task == "segment" else len(synthetic.FINDINGS)
    else:
        counts, labels = {}, len(LABEL_NAMES.get(cfg.dataset, ())) or None
        for name in ("train", "val", "test"):
            path = getattr(cfg, f"{name}_list")
            if not path:  # a plan without the lists: the schedule still resolves, the counts stay unknown
                counts[name] = None
                continue
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such split list")
            rows = [line.split() for line in data.text_lines(path) if line.strip()]
            counts[name] = len(rows)
            if name == "train" and cfg.task == "classify":
                labels = len(rows[0]) - 1 if rows else 0
    if cfg.label_fraction < 1 and counts["train"]:
        counts["train"] = len(label_subset(counts["train"], cfg.label_fraction, cfg.seed))
    cfg = resolve_schedule(cfg, preset, counts["train"])
    classify = cfg.task == "classify"
    return {
        "task": cfg.task, "dataset": cfg.dataset, "ratio": cfg.ratio, "init": init,
        "encoder": {"preset": preset, "input_size": size, "patch_size": sizes.patch_size, "embed_dim": sizes.embed_dim,
                    "depth": sizes.depth, "num_heads": sizes.num_heads, "drop_path": cfg.drop_path,
                    "frozen": cfg.linear_probe},
        "head": (f"mean of the patch tokens, LayerNorm, Linear {sizes.embed_dim} -> {labels or 'K'}"
                 + (", fitted first as a linear probe of the frozen features (LP-FT)" if cfg.head_init == "probe"
                    else "") if classify else
                 f"UPerNet-style head on blocks {Segmenter.tap_blocks(sizes.depth)}, {SEG_HEADS[preset]['channels']} "
                 f"channels, dropout 0.1, one logit a pixel; auxiliary FCN head ({SEG_HEADS[preset]['aux_channels']} "
                 f"channels) on block {Segmenter.tap_blocks(sizes.depth)[2]}'s level in training; loss focal 2.0 + "
                 "Dice 1.0, auxiliary 0.8 + 0.4"),
        "records": counts,
        "label_names": list(LABEL_NAMES.get(cfg.dataset, [f"l{j + 1}" for j in range(labels or 0)])) if classify
                       else ["+".join(f.strip() for f in cfg.seg_findings.split(","))] if cfg.dataset == "synthetic"
                       else list(LABEL_NAMES.get(cfg.dataset, ["finding"])),
        "schedule": {"steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "batch_size": cfg.batch_size,
                     "lr": learning_rates(cfg),
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


def build_parser() -> argparse.ArgumentParser:
    return config_parser(FinetuneConfig, "finetune.py", __doc__, CHOICES, LIMITS, shown_default)


def shown_default(f) -> str:
    """What --help shows as a flag's default: the fields left open say where their value comes from."""
    if f.name in RECIPES[("classify", "released")]:  # e.g. "released 0.1, synthetic demo 0.0"
        parts = []
        for records in ("released", "synthetic"):
            by_task = {task: r[f.name] for (task, rec), r in RECIPES.items() if rec == records}
            value = by_task["classify"] if len(set(by_task.values())) == 1 else \
                f"{by_task['classify']} (segmentation {by_task['segment']})"
            parts.append(f"{'released' if records == 'released' else 'synthetic demo'} {value}")
        return ", ".join(parts)
    return {"lr": "from --dataset and --ratio, their schedule (--dry_run shows it)",
            "steps": "from --dataset and --ratio", "warmup_steps": "from --dataset and --ratio",
            "batch_size": "from --dataset: 96, synthetic 32, segmentation 8 (tiny 32)",
            "eval_every": "once an epoch; segmentation 500 at 100%, 50 at 10% and 1%, 50 for the tiny demo",
            "epochs": "none: --steps", "image_root": "the list's folder",
            "out": "out/finetune, or out/segment with --task segment"}.get(f.name, f.default if f.default != ""
                                                                            else "none")


# what each number may be (data.bounded): counts at least 1, shares within (0, 1], rates positive
LIMITS = {**dict.fromkeys(["num_records", "num_val", "num_test", "steps", "batch_size", "eval_every"], bounded(int, 1)),
          **dict.fromkeys(["num_workers", "seed", "input_size", "warmup_steps"], bounded(int, 0)),
          **dict.fromkeys(["label_fraction", "min_crop"], bounded(float, 0, 1, low_open=True)),
          "drop_path": bounded(float, 0, 1, high_open=True), "layer_decay": bounded(float, 0, 1, low_open=True),
          **dict.fromkeys(["lr", "epochs"], bounded(float, 0, low_open=True))}
CHOICES = {"task": ["classify", "segment"], "dataset": sorted(LABEL_NAMES) + ["custom"], "ratio": [1, 10, 100],
           "preset": ["auto", "tiny", "base"], "amp": ["auto", "bf16", "fp16", "off"],
           "head_init": ["auto", "zero", "probe"], "optimizer": ["auto", "sgd", "adamw"]}


def main(argv=None):
    cfg = FinetuneConfig(**vars(build_parser().parse_args(argv)))
    cfg.out = default_out(cfg)

    def how_to_resume() -> str:
        kept = sorted(os.path.relpath(d, cfg.out) for d, _, files in os.walk(cfg.out) if "last.pt" in files) \
            if os.path.isdir(cfg.out) else []
        if not kept:
            return "no checkpoint was written"
        return f"{', '.join(os.path.join(cfg.out, k, 'last.pt') for k in kept)} intact; continue with --resume"

    with data.one_line_errors("finetune.py", NonFiniteLoss, interrupted=how_to_resume):
        if cfg.dry_run:  # what resolving the settings says goes to stderr: stdout is the JSON alone
            with contextlib.redirect_stdout(sys.stderr):
                settings = plan(cfg)
            print(json.dumps(settings))
            return
        run(cfg)


if __name__ == "__main__":
    main()
