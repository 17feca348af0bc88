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
the step), and per learning rate lr_<lr>/log.jsonl, lr_<lr>/best.pt (the selected weights) and lr_<lr>/last.pt
(to continue with --resume). One process, as the paper's classification runs (one GPU); AMP on a GPU.
"""
import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import recipes
from finetune_data import (LABEL_NAMES, FinetuneDataset, StepSampler, build_splits, count_splits, resolve_lists,
                           to_input)
from machinery import settings
from machinery.run import Run
from metrics import auc_table, dice_per_image, linear_probe, mean_auc, roc_auc
from mrm import MRMConfig, ViT

LOG_EVERY = 10  # steps between training-loss lines of log.jsonl (validations add their own)


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
    num_workers: int | None = None   # data loading processes (none: 2 on a CPU; on a GPU its CPUs less one, 2-8)
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


# -----------------------------------------------------------------------------
# Losses


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


# -----------------------------------------------------------------------------
# Evaluation, and LP-FT's probe


def build_model(cfg: FinetuneConfig, sizes: MRMConfig, size: int, weights: dict | None, num_labels: int):
    """The encoder at input `size` with --init's `weights` (settings.finetuning_encoder; None: as initialised),
    under a new classification or segmentation head."""
    encoder = ViT(size, sizes.patch_size, sizes.in_chans, sizes.embed_dim, sizes.depth, sizes.num_heads,
                  sizes.mlp_ratio, drop_path_rate=cfg.drop_path)
    if weights is not None:
        encoder.load_state_dict(weights, strict=False)
    model = Classifier(encoder, num_labels) if cfg.task == "classify" else \
        Segmenter(encoder, **recipes.SEG_HEADS["base" if sizes.embed_dim == MRMConfig().embed_dim else "tiny"])
    if cfg.linear_probe:
        encoder.requires_grad_(False)
    return model


def outputs(forward, dataset: FinetuneDataset, cfg: FinetuneConfig, sizes: MRMConfig, device, dtype, desc: str):
    """forward(x) on every record's test view, a batch at a time: (outputs as floats on the CPU, targets)."""
    loader = DataLoader(dataset, batch_size=cfg.batch_size, pin_memory=device.type == "cuda",
                        num_workers=settings.loader_workers(cfg.num_workers, device))
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            yield forward(to_input(batch["image"], device, sizes)).float().cpu(), batch["target"].numpy()


def evaluate(model, dataset: FinetuneDataset, cfg: FinetuneConfig, sizes: MRMConfig, device, dtype, desc: str):
    """Classification: (AUC per label (K,), scores (N, K)); segmentation: (Dice per image (N,), whether
    each image's truth holds the finding (N,))."""
    model.eval()  # the caller sets its training mode again
    scores, truths = [], []
    for logits, target in outputs(model, dataset, cfg, sizes, device, dtype, desc):
        if cfg.task == "classify":
            scores.append(torch.sigmoid(logits).numpy())
            truths.append(target)
        else:  # a pixel is the finding where its logit is above 0 (p > 0.5)
            scores.append(dice_per_image((logits[:, 0] > 0).numpy(), target))
            truths.append(target.reshape(len(target), -1).any(1))
    scores, truths = np.concatenate(scores), np.concatenate(truths)
    if cfg.task == "classify":
        return roc_auc(truths, scores), scores
    return scores, truths


def head_inputs(model: Classifier, dataset: FinetuneDataset, cfg: FinetuneConfig, sizes: MRMConfig, device, dtype):
    """(N, D): what the head reads, fc_norm(mean patch token), for every record's test view."""
    model.eval()  # the caller sets its training mode again
    features = outputs(model.features, dataset, cfg, sizes, device, dtype, "features for the probe")
    return torch.cat([f for f, _ in features])


def fit_head_to_probe(model: Classifier, datasets: dict, cfg: FinetuneConfig, sizes: MRMConfig, device, dtype) -> dict:
    """LP-FT (Kumar et al., 2022, "Fine-tuning can distort pretrained features"): before any step, set the
    head to a logistic regression fitted to convergence on the frozen encoder's features of the training
    records' test views, without augmentation (weight decay chosen on validation mean AUC), so fine-tuning
    starts where a linear probe ends instead of from a head near 0 that a short schedule never finishes
    training. The features are standardised for the fit (metrics.linear_probe) and the standardisation
    folded into the head, which stays one Linear."""
    fitted = linear_probe({k: head_inputs(model, datasets[k], cfg, sizes, device, dtype) for k in ("train", "val")},
                          {k: datasets[k].labels for k in ("train", "val")}, recipes.PROBE_WEIGHT_DECAYS)
    w, mean, std = fitted["w"], fitted["mean"], fitted["std"]
    with torch.no_grad():  # head(f) = ((f - mean) / std) @ w + b
        model.head.weight.copy_((w / std[:, None]).T)
        model.head.bias.copy_(fitted["b"] - (mean / std) @ w)
    print(f"head fitted to a probe of the frozen features (weight decay {fitted['weight_decay']:g}): "
          f"validation mean AUC {fitted['val_auc_mean']:.4f} before fine-tuning")
    return {"val": fitted["val_auc_mean"], "weight_decay": fitted["weight_decay"]}


# -----------------------------------------------------------------------------
# Fine-tuning at one lr, then a whole run


def fit(cfg: FinetuneConfig, lr: float, datasets: dict, names, encoder: tuple, device, dtype, run: Run) -> dict:
    """Fine-tune at one learning rate; keep the weights with the best validation score in lr_<lr>/best.pt.
    encoder: settings.finetuning_encoder's. Returns {'lr', 'val', 'step', 'checkpoint'}."""
    _, sizes, _, size, weights = encoder
    classify = cfg.task == "classify"
    torch.manual_seed(cfg.seed)  # the new head's init, drop-path
    model = build_model(cfg, sizes, size, weights, len(names)).to(device)
    optimizer = recipes.finetuning_optimizer(model, cfg.optimizer, lr, cfg.layer_decay)  # SGD or AdamW, as released
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    config = {**asdict(cfg), "lr": lr}
    state = run.resumable(f"lr_{lr:g}", config)  # --resume: what this lr's stopped run left (its last.pt)
    step, best = (state["step"], state["best"]) if state is not None else \
        (0, {"lr": lr, "val": -math.inf, "step": 0, "checkpoint": run.path("best.pt")})
    if step >= cfg.steps:
        return best
    sampler = StepSampler(len(datasets["train"]), cfg.batch_size, cfg.steps, cfg.seed, start_step=step)
    loader = DataLoader(datasets["train"], batch_size=cfg.batch_size, sampler=sampler, pin_memory=device.type == "cuda",
                        num_workers=settings.loader_workers(cfg.num_workers, device))
    batches = iter(loader)  # draws a seed from torch's generator: before the saved state is put back
    if state is not None:  # the weights, the moments, and the generator drop-path continues from
        run.restore(state, model, optimizer, scaler)
    schedule = recipes.lr_at if classify else recipes.poly_lr_at  # cosine (classification), polynomial (segmentation)

    def train_mode():
        model.train()
        if cfg.linear_probe:
            model.encoder.eval()  # frozen: no drop-path either

    def validate(train_loss):
        """Score the validation split; save the state to resume from and the best weights; log one line."""
        values, _ = evaluate(model, datasets["val"], cfg, sizes, device, dtype, "validation")
        train_mode()
        val = summary(values, names, cfg, "validation")
        better = val > best["val"]
        if better:
            best.update(val=val, step=step)
        weights = model.state_dict()
        run.save({"model": weights, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                  "best": best, "config": config},
                 best={"model": weights, "step": step, "val": val, "config": config, "model_config": sizes.to_dict(),
                       "labels": list(names)} if better else None,
                 line={"step": step, "lr": optimizer.param_groups[-1]["lr"], "train_loss": train_loss,
                       ("val_auc_mean" if classify else "val_dice"): val})
        return val

    if state is None and classify and cfg.head_init == "probe":
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
                       for out, (wf, wd) in zip(logits, recipes.SEG_LOSS_WEIGHTS.values()))
        scaler.scale(loss).backward()
        if classify:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipes.CLIP_GRAD_NORM)  # the frozen have no grad
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum, loss_steps = loss_sum + loss.detach(), loss_steps + 1
        recent.append(loss.detach())
        bar.update()
        if step % LOG_EVERY == 0:  # the curve's points: the mean loss since the last point or validation
            run.log_step(step, {"train_loss": torch.stack(recent).mean()}, lr=optimizer.param_groups[-1]["lr"])
            recent = []
        if step % cfg.eval_every and step != cfg.steps:
            continue
        # a validation (with the loss lines above, the loop's only host syncs); a resumed run starts here
        train_loss = run.read(step, {"train_loss": loss_sum / loss_steps})["train_loss"]  # a NaN stops the run
        loss_sum, loss_steps, recent = torch.zeros((), device=device), 0, []
        val = validate(train_loss)
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val:.4f}", best=f"{best['val']:.4f}")
    bar.close()
    print(f"lr {lr:g}: best validation {'mean AUC' if classify else 'Dice'} {best['val']:.4f} at step {best['step']}")
    return best


def finetune(cfg: FinetuneConfig, rendered: dict | None = None, run: Run | None = None) -> dict:
    """Fine-tune at each lr of the grid, select on validation, score the test split once. Returns results.
    rendered: see build_splits. run: main's (its one-line framing); a call from Python makes its own."""
    run = run or Run("finetune.py")
    cfg, encoder = resolve(cfg, run)
    init, sizes, preset, size, _ = encoder
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.amp_dtype(cfg.amp, device)
    datasets, names = build_splits(cfg, size, rendered)
    cfg = recipes.fill_schedule(cfg, len(datasets["train"]))
    lrs = recipes.learning_rates(cfg)
    print(f"fine-tuning ({cfg.task}) {preset} encoder from {init} at {size} px on {cfg.dataset}: "
          f"{len(datasets['train'])} train / {len(datasets['val'])} val / {len(datasets['test'])} test, "
          f"{cfg.steps} steps of {cfg.batch_size} (warm-up {cfg.warmup_steps}), lr {lrs}, device {device}"
          f"{'' if dtype is None else ' ' + str(dtype).split('.')[-1]}")
    run.open(device=device, fp16=dtype == torch.float16)  # every check passed: the run takes its folder
    fits = [fit(cfg, lr, datasets, names, encoder, device, dtype, run) for lr in lrs]
    chosen = max(fits, key=lambda r: r["val"])  # selected on validation only

    # the test split, scored once, with the selected weights
    model = build_model(cfg, sizes, size, None, len(names)).to(device)
    model.load_state_dict(torch.load(chosen["checkpoint"], map_location="cpu", weights_only=True)["model"])
    values, extra = evaluate(model, datasets["test"], cfg, sizes, device, dtype, "test")
    test = summary(values, names, cfg, "test")
    results = {"task": cfg.task, "dataset": cfg.dataset, "init": init, "selected_lr": chosen["lr"],
               "best_step": chosen["step"], "checkpoint": chosen["checkpoint"],
               "val_by_lr": {f"{r['lr']:g}": r["val"] for r in fits},
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
    run.write("results.json", results)
    print(f"selected lr {chosen['lr']:g} (step {chosen['step']}); results in {os.path.join(cfg.out, 'results.json')}")
    run.close()
    return results


def random_encoder_probe(cfg: FinetuneConfig, datasets: dict, sizes: MRMConfig, size: int, device, dtype) -> float:
    """Test mean AUC of a linear probe of a randomly initialised encoder (the seed's), fitted as LP-FT fits
    the head: the score a scratch run starts from, printed beside the synthetic demo's result."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, sizes, size, None, datasets["train"].labels.shape[1]).to(device)
    splits = ("train", "val", "test")
    return linear_probe({k: head_inputs(model, datasets[k], cfg, sizes, device, dtype) for k in splits},
                        {k: datasets[k].labels for k in splits}, recipes.PROBE_WEIGHT_DECAYS)["test_auc_mean"]


def summary(values: np.ndarray, names, cfg: FinetuneConfig, split: str) -> float:
    """The one number a run is judged by: mean AUC over labels, or mean Dice over images."""
    return mean_auc(values, names, split) if cfg.task == "classify" else float(values.mean())


# -----------------------------------------------------------------------------
# Command line: the flags are FinetuneConfig's fields


def resolve(cfg: FinetuneConfig, run: Run) -> tuple[FinetuneConfig, tuple]:
    """The settings of a run and of its --dry_run, resolved the one way: --out, the lists of --splits, the
    recipe of the records (the released one, or the demo's), the folder, and the encoder with its --init
    weights (settings.finetuning_encoder); each refused in one line, before anything is read or written."""
    # by default the two demos write apart: `python finetune.py --task segment` after `python finetune.py`
    cfg = replace(cfg, out=cfg.out or os.path.join("out", "finetune" if cfg.task == "classify" else "segment"))
    settings.check_finetuning(cfg)
    cfg = recipes.fill_finetuning(resolve_lists(cfg))
    run.check(cfg)
    return cfg, settings.finetuning_encoder(cfg, say="nothing" if cfg.dry_run else "summary")


def plan(cfg: FinetuneConfig, encoder: tuple) -> dict:
    """--dry_run: every setting finetune() would use, from resolve()'s, without reading an image. The split
    lists are read (lines and labels), not checked against the images."""
    init, sizes, preset, size, _ = encoder
    counts, names = count_splits(cfg)
    cfg = recipes.fill_schedule(cfg, counts["train"])
    return recipes.finetuning_plan(cfg, init, sizes, preset, size, counts, names, Segmenter.tap_blocks(sizes.depth))


def build_parser():
    return settings.config_parser(FinetuneConfig, "finetune.py", __doc__, CHOICES, LIMITS,
                                  recipes.finetuning_help_default)


# what each number may be (settings.bounded): counts at least 1, shares within (0, 1], rates positive
bounded = settings.bounded
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
    with Run("finetune.py") as run:  # however it ends: one line for an expected error or a stop, the folder let go
        if not cfg.dry_run:
            finetune(cfg, run=run)
            return
        with contextlib.redirect_stdout(sys.stderr):  # what resolving says goes to stderr: stdout is the JSON alone
            settings_ = plan(*resolve(cfg, run))
        print(json.dumps(settings_, allow_nan=False))


if __name__ == "__main__":
    main()
