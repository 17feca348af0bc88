"""Pre-train MRM (SPEC.md section 2). The same script runs on a laptop and under torchrun:

    python train.py                                        # tiny model, synthetic records, CPU: minutes
    torchrun --nproc_per_node 4 train.py --preset base \\
        --data training.csv --image_root mimic-cxr-jpg/    # the paper's run: 4 x 64 = batch 256

Every flag is a field of TrainConfig (`python train.py --help` lists them with their defaults).
Writes to --out: ckpt.pt (atomically, every --save_every epochs and at the end), log.jsonl, recon.png
(the paper's Fig. 3) and tokenizer.json. `--resume out/ckpt.pt` continues exactly where a run stopped.
"""
import argparse
import inspect
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from mrm import MRM, MRMConfig, load_pretrained, patchify, read_checkpoint, unpatchify

# The recipe's numbers that depend on the model size: base is the paper's (SPEC.md section 2), tiny is
# a demo that visibly learns within a few minutes on a 2-core CPU.
RECIPES = {
    "base": dict(epochs=200, warmup_epochs=40, batch_size=64, blr=1.5e-4, num_records=10000),
    "tiny": dict(epochs=10, warmup_epochs=1, batch_size=32, blr=5e-3, num_records=2048),
}


@dataclass
class TrainConfig:
    # data
    preset: str = "tiny"             # model size: tiny (CPU demo) or base (the paper's ViT-B/16)
    data: str = "synthetic"          # 'synthetic' (built in, no download) or a training.csv path
    image_root: str = ""             # folder the CSV's image_path values are relative to
    tokenizer: str = ""              # tokenizers JSON or BERT vocab.txt; empty: train a WordPiece on the reports
    vocab_size: int = 30000          # of a tokenizer trained here
    num_records: int | None = None   # synthetic records
    hflip: bool = True               # mirror half the crops (SPEC); mirroring makes 'left'/'right' ambiguous
    skip_bad: bool = False           # skip unreadable images and bad CSV rows (counted) instead of stopping
    # optimisation (SPEC.md section 2)
    epochs: int | None = None        # passes over the records
    warmup_epochs: float | None = None  # linear warm-up before the cosine
    batch_size: int | None = None    # per process (base: 4 GPUs x 64 = the paper's 256)
    accum_iter: int = 1              # micro-batches per optimizer step
    blr: float | None = None         # base lr for batch 256: lr = blr * effective batch / 256
    min_lr: float = 0.0              # where the cosine ends
    weight_decay: float = 0.05       # AdamW's, on matrices only
    # model switches (Tables 4 and 5); the sizes come from --preset
    mask_ratio: float = 0.75         # of the image patches removed (Table 5b)
    text_mask_ratio: float = 0.5     # of the report tokens masked (Sec. 3.1)
    mim_weight: float = 1.0          # lambda of Eq. 3 on L_I (Table 5c); 0 = report restoration only
    mlm_weight: float = 1.0          # weight of L_R; 0 = self-supervision only (Table 4)
    super_resolution: bool = True    # restore 2x patches (Sec. 3.2); off: restore the input patches
    fusion: str = "gap"              # global average (gap) or max (gmp) pooling of the image feature (Table 5a)
    norm_pix_loss: bool = False      # normalise each target patch (the released run script's choice)
    multimodal_mim: bool = False     # add the report's mean embedding to the image decoder input (Table 4)
    # run
    out: str = "out"                 # folder for ckpt.pt, log.jsonl, recon.png, tokenizer.json
    resume: str = ""                 # a ckpt.pt of this script: continue that run exactly
    init: str = ""                   # MAE or MRM weights for the encoder (e.g. mae_pretrain_vit_base.pth)
    amp: str = "auto"                # auto (bf16 where the GPU has it, else fp16; off on CPU), bf16, fp16, off
    compile: bool = False            # torch.compile the model
    num_workers: int = 2             # data loading processes per training process
    save_every: int = 1              # epochs between checkpoints (and recon.png)
    log_every: int = 10              # optimizer steps between log.jsonl lines
    seed: int = 0                    # model init, data order, crops and masks all follow from it


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the fields left at None from the preset's recipe."""
    if cfg.preset not in RECIPES:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose from {sorted(RECIPES)}")
    for k, v in RECIPES[cfg.preset].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    return cfg


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0, then half-cycle cosine to min_lr; set every optimizer step (MAE's schedule)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: none on biases, norms and other 1-D parameters (SPEC.md section 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# Distributed set-up: nothing happens when RANK is unset (plain `python train.py`)


def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, read with a clear refusal


def save_checkpoint(path: str, state: dict):
    """Write to a temporary file, flush it to disk, then rename over the old one: a crash at any moment
    leaves either the old checkpoint or the new one, never a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "config", "model_config", "tokenizer", "rng")


def load_checkpoint(path: str) -> dict:
    ckpt = read_checkpoint(path)  # refuses missing, truncated and non-checkpoint files, naming them
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a train.py checkpoint (lacks {missing}); for weights only, use --init")
    return ckpt


# -----------------------------------------------------------------------------
# Data


def build_data(cfg: TrainConfig, mcfg: MRMConfig, ckpt: dict | None, rank: int):
    """Records, tokenizer and the Dataset. Returns (dataset, tokenizer)."""
    from tokenizers import Tokenizer

    hr = 2 * mcfg.img_size
    if cfg.data == "synthetic":
        images = data.SyntheticImages(cfg.num_records, size=min(2 * hr, 512), seed=cfg.seed)
        reports = [data.synth_report(i, cfg.seed) for i in range(cfg.num_records)]
    else:
        images, reports, n_bad = data.read_training_csv(cfg.data, cfg.image_root or os.path.dirname(cfg.data),
                                                        cfg.skip_bad)
        if n_bad and rank == 0:
            print(f"skipped {n_bad} bad rows of {cfg.data}")
    tok_path = os.path.join(cfg.out, "tokenizer.json")
    if ckpt is not None:  # the tokenizer the run started with travels inside its checkpoint
        tok = Tokenizer.from_str(ckpt["tokenizer"])
    elif cfg.tokenizer:
        tok = data.load_tokenizer(cfg.tokenizer)
    else:  # train once (rank 0), the other ranks read it
        if rank == 0:
            print(f"training a WordPiece tokenizer on {len(reports)} reports")
            data.train_tokenizer(reports, cfg.vocab_size).save(tok_path)
        if dist.is_initialized():
            dist.barrier()
        tok = data.load_tokenizer(tok_path)
    if rank == 0 and (cfg.tokenizer or ckpt is not None):
        tok.save(tok_path)
    tokens = data.encode_reports(tok, reports, mcfg.max_text_len)
    dataset = data.PretrainDataset(images, tokens, hr, (mcfg.img_size // mcfg.patch_size) ** 2,
                                   mcfg.text_mask_ratio, tok.token_to_id("[MASK]"), tok.token_to_id("[PAD]"),
                                   seed=cfg.seed, hflip=cfg.hflip, skip_bad=cfg.skip_bad)
    return dataset, tok


def model_config(cfg: TrainConfig, tok) -> MRMConfig:
    return MRMConfig.from_preset(
        cfg.preset, vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"),
        mask_token_id=tok.token_to_id("[MASK]"), mask_ratio=cfg.mask_ratio, text_mask_ratio=cfg.text_mask_ratio,
        mim_weight=cfg.mim_weight, mlm_weight=cfg.mlm_weight, super_resolution=cfg.super_resolution,
        fusion=cfg.fusion, norm_pix_loss=cfg.norm_pix_loss, multimodal_mim=cfg.multimodal_mim)


# -----------------------------------------------------------------------------
# The reconstruction picture (Fig. 3): masked input, restored image, original; masked, restored and
# original report, restored words green where right and red where wrong.


def words(tok, ids, colours=None) -> list[tuple[str, str]]:
    """Token ids -> [(text, colour)], word pieces ('##ing') glued to the previous piece, [PAD] dropped."""
    out = []
    for n, i in enumerate(ids):
        t = tok.id_to_token(int(i))
        if t == "[PAD]":
            break
        if t == "[CLS]":
            continue
        colour = colours[n] if colours else "black"
        out.append((t[2:], colour) if t.startswith("##") else (" " + t, colour))
    return out


def draw_words(draw, font, x, y, width, title, pieces) -> int:
    """Wrap coloured pieces into `width` pixels from (x, y); returns the y below the text."""
    line_h = font.size + 4
    draw.text((x, y), title, fill="gray", font=font)
    y += line_h
    cx = x
    for text, colour in pieces:
        w = draw.textlength(text, font=font)
        if cx + w > x + width and cx > x:
            cx, y = x, y + line_h
            text = text.lstrip()
            w = draw.textlength(text, font=font)
        draw.text((cx, y), text, fill=colour, font=font)
        cx += w
    return y + line_h + 6


@torch.no_grad()
def save_recon(model: MRM, dataset: data.PretrainDataset, tok, path: str, n: int = 4, panel: int = 256):
    cfg, device = model.cfg, next(model.parameters()).device
    hr, p = 2 * cfg.img_size, cfg.patch_size
    rng = np.random.default_rng(0)  # the same records and masks every time: pictures compare across epochs
    imgs, toks, labels = [], [], []
    for i in range(min(n, len(dataset))):
        img, j, _ = dataset.load(i)
        imgs.append(data.full_view(img, hr))
        t, l = data.mask_report(dataset.tokens[j], cfg.text_mask_ratio, rng, dataset.mask_id, dataset.pad_id)
        toks.append(t), labels.append(l)
    images = torch.from_numpy(np.stack(imgs))[:, None].to(device)
    tokens, labels = torch.from_numpy(np.stack(toks)).long().to(device), torch.from_numpy(np.stack(labels)).long()
    noise = torch.from_numpy(rng.random((len(imgs), dataset.num_patches), dtype=np.float32))
    was_training = model.training
    model.eval()
    out = model(images, tokens, labels.to(device), noise=noise)
    model.train(was_training)
    high, low, _ = model.prepare_images(images)
    G = cfg.img_size // p
    mask = out["mask"].reshape(-1, 1, G, G)
    # masked input: the low-res image with its removed patches gray, shown at the high-res size
    mask_hr = mask.repeat_interleave(2 * p, 2).repeat_interleave(2 * p, 3)
    shown_low = torch.nn.functional.interpolate(low, scale_factor=2, mode="nearest")
    columns = [shown_low * (1 - mask_hr) + 0.5 * mask_hr]
    if "pred" in out:
        pred = out["pred"].float()
        size = 2 * p if cfg.super_resolution else p
        if cfg.norm_pix_loss:  # the decoder predicts normalised patches: undo with the target's statistics
            target = patchify(high if cfg.super_resolution else low, size)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        restored = unpatchify(pred, size, high.shape[1])
        if not cfg.super_resolution:
            restored = torch.nn.functional.interpolate(restored, scale_factor=2, mode="bicubic")
        columns.append((restored * mask_hr + high * (1 - mask_hr)).clamp(0, 1))  # restored + visible
    columns.append(high)

    font = ImageFont.load_default(size=13)
    text_w = 720
    rows = []
    for b in range(len(imgs)):
        row = Image.new("RGB", (len(columns) * panel + text_w, 2 * panel), "white")
        for c, col in enumerate(columns):
            arr = (col[b, 0].float().cpu().numpy() * 255).round().astype(np.uint8)
            row.paste(Image.fromarray(arr).resize((panel, panel), Image.BICUBIC), (c * panel, 0))
        draw = ImageDraw.Draw(row)
        x, y = len(columns) * panel + 10, 4
        y = draw_words(draw, font, x, y, text_w - 20, "masked report", words(tok, tokens[b].cpu()))
        if "mlm_logits" in out:
            guess = out["mlm_logits"].argmax(-1).cpu()
            where = (labels != -100).nonzero().tolist()  # row-major, the order of mlm_logits
            restored_ids, colours = tokens[b].cpu().clone(), ["black"] * tokens.shape[1]
            for (bb, t), g in zip(where, guess):
                if bb == b:
                    restored_ids[t] = g
                    colours[t] = "green" if g == labels[bb, t] else "red"
            y = draw_words(draw, font, x, y, text_w - 20, "restored (green right, red wrong)",
                           words(tok, restored_ids, colours))
        orig = torch.where(labels[b] != -100, labels[b], tokens[b].cpu())
        y = draw_words(draw, font, x, y, text_w - 20, "original report", words(tok, orig))
        rows.append(row.crop((0, 0, row.width, max(panel, y))))
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows) + 24), "white")
    ImageDraw.Draw(sheet).text((10, 4), "masked input | " + ("restored | " if "pred" in out else "") + "original",
                               fill="gray", font=font)
    y = 24
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    sheet.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


# -----------------------------------------------------------------------------
# Training


class NonFiniteLoss(RuntimeError):
    pass


def amp_dtype(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


def train(cfg: TrainConfig, ckpt: dict | None = None) -> dict:
    """Run (or continue) pre-training; returns the last logged values."""
    cfg = resolve(cfg)
    if cfg.resume and ckpt is None:
        ckpt = load_checkpoint(cfg.resume)
    rank, world, device = setup_distributed()
    main_process = rank == 0
    torch.manual_seed(cfg.seed)
    if main_process:
        os.makedirs(cfg.out, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()

    # data and model (a resumed run rebuilds both from its checkpoint)
    if ckpt is not None:
        mcfg = MRMConfig.from_dict(ckpt["model_config"])
        dataset, tok = build_data(cfg, mcfg, ckpt, rank)
    else:
        probe = MRMConfig.from_preset(cfg.preset, text_mask_ratio=cfg.text_mask_ratio)  # sizes the data needs
        dataset, tok = build_data(cfg, probe, None, rank)
        mcfg = model_config(cfg, tok)
    model = MRM(mcfg).to(device)
    if cfg.init and ckpt is None:
        load_pretrained(model.encoder, cfg.init, verbose=main_process)

    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    start_epoch, step = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_initialized() else model
    if cfg.compile:
        net = torch.compile(net)

    # the same sampler with or without torchrun: the data order is a function of (seed, epoch) only
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True)
    steps_per_epoch = len(loader) // cfg.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} records are too few for {world} x {cfg.batch_size} x {cfg.accum_iter}")
    eff_batch = cfg.batch_size * cfg.accum_iter * world
    lr = cfg.blr * eff_batch / 256
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    log_path = os.path.join(cfg.out, "log.jsonl")
    if main_process:
        print(f"MRM {cfg.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{len(dataset)} records, vocabulary {mcfg.vocab_size}, device {device}"
              f"{'' if dtype is None else ' ' + str(dtype).split('.')[-1]}, {world} process(es)")
        print(f"effective batch {eff_batch} = {world} x {cfg.batch_size} x {cfg.accum_iter}, lr {lr:.3g}, "
              f"{steps_per_epoch} steps/epoch, epochs {start_epoch}..{cfg.epochs}")
        if ckpt is not None:  # drop what the interrupted run logged after its checkpoint
            kept = [l for l in open(log_path)] if os.path.exists(log_path) else []
            kept = [l for l in kept if json.loads(l)["step"] <= step]
            with open(log_path, "w") as f:
                f.writelines(kept)

    last = {}
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)  # the loader's workers start below, with this epoch's seed
        batches = iter(loader)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not main_process,
                   leave=False, dynamic_ncols=True)
        tick, seen, skipped = time.perf_counter(), 0, 0
        for _ in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, lr, cfg.min_lr)
            micro = [next(batches) for _ in range(cfg.accum_iter)]
            # Eq. 1 averages over the masked tokens of the whole step; reports differ in length, so each
            # micro-batch divides its summed cross entropy by the mean count per micro-batch over every
            # process and micro-step. Then 1 x 256, 4 x 64 and 4 x 32 x 2 take the same gradient.
            n_masked = sum((b["labels"] != -100).sum() for b in micro).to(device, torch.float32)
            denominator = all_reduce_sum(n_masked) / (world * cfg.accum_iter)
            sums = torch.zeros(3, device=device)
            for k, b in enumerate(micro):
                last_micro = k == cfg.accum_iter - 1
                sync = nullcontext() if last_micro or not isinstance(net, DistributedDataParallel) else net.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        out = net(b["image"].to(device, non_blocking=True), b["tokens"].to(device, non_blocking=True),
                                  b["labels"].to(device, non_blocking=True), noise=b["noise"],
                                  mlm_denominator=denominator)
                    scaler.scale(out["loss"] / cfg.accum_iter).backward()
                sums += torch.stack([out["loss"], out["loss_mim"], out["loss_mlm"]]).detach().float() / cfg.accum_iter
                skipped += int(b["skipped"].sum())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss, loss_mim, loss_mlm = (all_reduce_sum(sums) / world).tolist()  # one host sync a step
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"the loss is {loss} at step {step} (epoch {epoch + 1}); stopping. The last "
                                    f"good checkpoint in {cfg.out} is left as it was: lower --blr, or --amp bf16/off")
            seen += eff_batch
            if main_process:
                bar.set_postfix(loss=f"{loss:.3f}", mim=f"{loss_mim:.4f}", mlm=f"{loss_mlm:.3f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                last = {"step": step, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "loss": loss,
                        "loss_mim": loss_mim, "loss_mlm": loss_mlm, "images_per_s": seen / (now - tick)}
                if skipped:
                    last["skipped_images"] = skipped
                tick, seen = now, 0
                if main_process:
                    bar.set_postfix(loss=f"{loss:.3f}", mim=f"{loss_mim:.4f}", mlm=f"{loss_mlm:.3f}",
                                    img_s=f"{last['images_per_s']:.0f}")
                    with open(log_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
        bar.close()
        if main_process:
            print(f"epoch {epoch + 1}/{cfg.epochs}: step {step}, loss {loss:.4f} (image {loss_mim:.4f}, "
                  f"report {loss_mlm:.4f})" + (f", {skipped} unreadable images skipped" if skipped else ""))
        if main_process and ((epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs):
            save_checkpoint(os.path.join(cfg.out, "ckpt.pt"), {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "step": step, "config": asdict(cfg), "model_config": mcfg.to_dict(),
                "tokenizer": tok.to_str(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}})
            save_recon(model, dataset, tok, os.path.join(cfg.out, "recon.png"))
        if dist.is_initialized():
            dist.barrier()  # no rank runs ahead of the checkpoint
    if dist.is_initialized():
        dist.destroy_process_group()
    return last


# -----------------------------------------------------------------------------
# Command line: the flags are TrainConfig's fields


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: the namespace holds only the flags actually given, so a resumed run can tell them apart
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))  # int | None -> int
        default = f.default if f.default is not None else "from --preset: " + ", ".join(
            f"{p} {r[f.name]}" for p, r in RECIPES.items())
        text = f"{HELP.get(f.name, '')} (default: {default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, choices=CHOICES.get(f.name), help=text)
    return parser


CHOICES = {"preset": sorted(RECIPES), "amp": ["auto", "bf16", "fp16", "off"], "fusion": ["gap", "gmp"]}
# each flag's help is the comment beside its field above
HELP = dict(re.findall(r"^    (\w+): [^#\n]*# (.*)$", inspect.getsource(TrainConfig), flags=re.M))


def parse_config(argv=None) -> tuple[TrainConfig, dict | None]:
    given = vars(build_parser().parse_args(argv))
    if not given.get("resume"):
        return TrainConfig(**given), None
    ckpt = load_checkpoint(given["resume"])
    saved = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in fields(TrainConfig)}}
    changed = {k: (saved.get(k), v) for k, v in given.items() if k != "resume" and saved.get(k) != v}
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print("resuming with changed settings: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    return TrainConfig(**{**saved, **given}), ckpt


def main(argv=None):
    cfg, ckpt = parse_config(argv)
    try:
        train(cfg, ckpt)
    except NonFiniteLoss as e:
        print(f"train.py: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(1)


if __name__ == "__main__":
    main()
