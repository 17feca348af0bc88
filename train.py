"""Pre-train MRM (Sec. 4.6; released main_pretrain.py, run.sh). The same script runs on a laptop and under torchrun:

    python train.py                                        # tiny model, synthetic records, CPU: minutes
    torchrun --nproc_per_node 4 train.py --preset base \\
        --data training.csv --image_root mimic-cxr-jpg/    # the paper's run: 4 x 64 = batch 256

Every flag is a field of TrainConfig (`python train.py --help` lists them with their defaults).
Writes to --out: ckpt.pt (atomically, every --save_every epochs and at the end), log.jsonl, recon.png
(the paper's Fig. 3), curves.png (the losses and the lr so far) and tokenizer.json. On synthetic records
the run ends with the fusion check (checks.py): are held-out reports' masked words restored better from
their film than from noise?
`--resume out/ckpt.pt` continues exactly where a run stopped.
"""
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import checks
import data
import recipes
from machinery import pictures, runs
from machinery.checkpoints import load_checkpoint, load_pretrained, pretraining_state, save_checkpoint
from machinery.console import one_line_errors, stop_at_step_boundaries, stop_requested
from machinery.errors import ConfigError, NonFiniteLoss
from machinery.files import TRAIN_RUN, release
from machinery.flags import bounded, config_parser
from machinery.records import csv_rows
from machinery.settings import check_pretraining, check_steps, continues_in
from machinery.tokenizer import load_tokenizer, train_tokenizer
from mrm import MRM, MRMConfig


@dataclass
class TrainConfig:
    # data
    preset: str = "tiny"             # model size: tiny (CPU demo) or base (the paper's ViT-B/16)
    data: str = "synthetic"          # 'synthetic' (built in, no download) or a training.csv path
    image_root: str = ""             # folder the CSV's image_path values are relative to (default: the CSV's folder)
    tokenizer: str = ""              # tokenizers JSON or BERT vocab.txt; empty: build a WordPiece from the reports
    vocab_size: int = 30000          # of a vocabulary built here
    num_records: int | None = None   # synthetic records
    hflip: bool | None = None        # mirror half the crops (released); the demo does not: its reports name sides
    min_crop: float = 0.2            # smallest area share a random resized crop keeps (released: 0.2)
    skip_bad: bool = False           # skip unreadable images and bad CSV rows (counted) instead of stopping
    # optimisation (Sec. 4.6, the released run.sh)
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
    fusion_tokens: str = "visible"   # tokens given the image feature: visible (paper) or all, [MASK] too (released)
    norm_pix_loss: bool = False      # normalise each target patch (the released run script's choice)
    multimodal_mim: bool = False     # add the report's mean embedding to the image decoder input (Table 4)
    # run
    out: str = "out"                 # folder for ckpt.pt, log.jsonl, recon.png, curves.png, tokenizer.json
    resume: str = ""                 # a ckpt.pt of this script: continue that run exactly
    overwrite: bool = False          # replace an earlier run found in --out (without it, such an --out is refused)
    init: str = ""                   # MAE or MRM weights for the encoder (e.g. mae_pretrain_vit_base.pth)
    trust_checkpoint: bool = False   # load --init/--resume even if it pickles objects beyond weights (runs their code)
    amp: str = "auto"                # auto (bf16 where the GPU has it, else fp16; off on CPU), bf16, fp16, off
    compile: bool = False            # torch.compile the model
    num_workers: int | None = None   # loader processes a process (none: 2 on a CPU; a GPU: its CPU share - 1, 2-8)
    save_every: int = 1              # epochs between checkpoints (and recon.png, curves.png)
    log_every: int = 10              # optimizer steps between log.jsonl lines
    seed: int = 0                    # model init, data order, crops and masks all follow from it
    fusion_check: int = 300          # synthetic data: held-out records for the fusion check at the end (0: none)
    fusion_every: int = 0            # epochs between fusion checks during the run, a curve in log.jsonl (0: end only)
    dry_run: bool = False            # print the resolved settings as one JSON object and stop, before reading an image


# -----------------------------------------------------------------------------
# The schedule and the step (Sec. 4.6)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0, then half-cycle cosine to min_lr; set every optimizer step (MAE's schedule)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: none on biases, norms and other 1-D parameters (MAE's rule, as the
    released main_pretrain.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def train_step(net, ddp, micro: list[dict], optimizer, scaler, dtype, device, world: int,
               compiled: bool = False) -> torch.Tensor:
    """One optimizer step over accumulation micro-batches. Returns a (5,) tensor on the device: loss,
    loss_mim, loss_mlm as means over the step and every process, the images skipped, and the processes
    that were sent a Ctrl-C or SIGTERM (console.stop_requested). Nothing here
    waits for the device (no .item()), so the host queues the next step while the GPU runs this one;
    the caller reads the values every --log_every steps. compiled: net is torch.compile's."""
    accum = len(micro)
    # The masked words of each micro-batch, (M,) flat positions, found on the host where the loader's
    # labels are: the GPU never has to count them (see MRM.forward).
    where = [torch.nonzero(b["labels"].flatten() != -100).squeeze(1) for b in micro]
    # Eq. 1 averages over the masked tokens of the whole step; reports differ in length, so each
    # micro-batch divides its summed cross entropy by the mean count per micro-batch over every
    # process and micro-step. Then 1 x 256, 4 x 64 and 4 x 32 x 2 take the same gradient.
    n_masked = torch.full((), float(sum(len(w) for w in where)), device=device)  # a fill, not a copy
    denominator = all_reduce_sum(n_masked) / (world * accum)
    sums = torch.zeros(5, device=device)  # a fill on the device: torch.tensor([...]) would wait for it
    if stop_requested():  # a Ctrl-C or SIGTERM, summed with the losses: every process stops after this step
        sums[4] = 1
    for k, (b, w) in enumerate(zip(micro, where)):
        w = w.pin_memory() if device.type == "cuda" else w  # pinned: the copy to the GPU does not block
        w = w.to(device, non_blocking=True)
        if compiled:  # its length, the count of masked words, changes every step: torch.compile then
            # builds one graph for any length at once, instead of a graph for the first length and a
            # second, dynamic one right after (a length of 0 or 1 still gets a graph of its own)
            torch._dynamo.mark_dynamic(w, 0)
        # gradients are all-reduced once, after the last micro-batch
        with ddp.no_sync() if ddp is not None and k < accum - 1 else nullcontext():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = net(b["image"].to(device, non_blocking=True), b["tokens"].to(device, non_blocking=True),
                          b["labels"].to(device, non_blocking=True), noise=b["noise"].to(device, non_blocking=True),
                          mlm_denominator=denominator, mlm_index=w)
            scaler.scale(out["loss"] / accum).backward()
        sums[:3] += torch.stack([out["loss"], out["loss_mim"], out["loss_mlm"]]).detach().float() / accum
        sums[3] += b["skipped"].sum()
    scaler.step(optimizer)  # with fused AdamW, fp16's inf check happens on the GPU too
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sums = all_reduce_sum(sums)
    sums[:3] /= world
    return sums


# -----------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, ckpt: dict | None = None) -> dict:
    """Run (or continue) pre-training; returns the last logged values."""
    cfg = recipes.fill_pretraining(cfg)  # the fields left open, from the preset's recipe
    if cfg.resume and ckpt is None:
        ckpt = load_checkpoint(cfg.resume, cfg.trust_checkpoint)
    sizes = model_sizes(cfg, ckpt)  # what the data needs; the model also needs the vocabulary's size
    check_pretraining(cfg, sizes, ckpt)
    rank, world, device = setup_distributed()
    main_process = rank == 0
    torch.manual_seed(cfg.seed)
    # data and model (a resumed run rebuilds both from its checkpoint); nothing is written before they are checked
    dataset, tok = build_data(cfg, sizes, ckpt, rank)
    mcfg = sizes if ckpt is not None else model_config(cfg, tok)
    model = MRM(mcfg).to(device)
    if cfg.init and ckpt is None:
        load_pretrained(model.encoder, cfg.init, verbose=main_process, trust=cfg.trust_checkpoint)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = build_optimizer(model, cfg.weight_decay, device)
    start_epoch = 0 if ckpt is None else ckpt["epoch"]
    if ckpt is not None:  # the data's randomness is seeded per sample: only torch's generators come back
        runs.load_state(ckpt, model, optimizer, scaler)
        runs.set_rng(ckpt["rng"]["torch"], ckpt["rng"]["cuda"], device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_initialized() else None
    net = torch.compile(ddp or model) if cfg.compile else ddp or model  # saved and drawn through `model`

    sampler, loader = build_loader(dataset, cfg, world, rank, device)
    steps_per_epoch = len(loader) // cfg.accum_iter
    check_steps(steps_per_epoch, len(dataset), world, cfg.batch_size, cfg.accum_iter)
    eff_batch = cfg.batch_size * cfg.accum_iter * world
    lr = cfg.blr * eff_batch / 256
    # the schedule runs in epochs; a resumed run on another batch size or GPU count picks it up there
    step, total = start_epoch * steps_per_epoch, cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    log_path, ckpt_path = os.path.join(cfg.out, "log.jsonl"), os.path.join(cfg.out, "ckpt.pt")
    stop_note = lambda: runs.kept_and_cause(runs.existing(ckpt_path), "--blr", dtype == torch.float16)  # noqa: E731
    if main_process:  # every check has passed: the run takes its folder, and says what it continues or changes
        runs.start(cfg.out, ckpt and cfg.resume, runs.resume_changes(ckpt, asdict(cfg), world, RESUME_MAY_CHANGE),
                   cfg.overwrite, continues_in(cfg.out, cfg.resume), TRAIN_RUN, f"--resume {ckpt_path}",
                   {"tokenizer.json": tok.to_str(pretty=True)})
        print(f"MRM {cfg.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{len(dataset)} records, vocabulary {mcfg.vocab_size}, device {device}"
              f"{'' if dtype is None else ' ' + str(dtype).split('.')[-1]}, {world} process(es)")
        print(f"effective batch {eff_batch} = {world} x {cfg.batch_size} x {cfg.accum_iter}, lr {lr:.3g}, "
              f"{steps_per_epoch} steps/epoch, epochs {start_epoch}..{cfg.epochs}")
        if ckpt is not None:  # what the stopped run logged after its checkpoint goes, the end's fusion check too
            runs.truncate_log(log_path, "epoch", start_epoch)
    barrier()

    last = {}
    stop_at_step_boundaries()  # from here a Ctrl-C or SIGTERM stops the run after a step (console.py)
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)  # the loader's workers start below, with this epoch's seed
        batches = iter(loader)
        # the bar on rank 0 at a terminal; in a log file, the line printed after each epoch
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=None if main_process else True, leave=False, dynamic_ncols=True)
        epoch_start = tick = time.perf_counter()
        seen = skipped = speed = 0
        pending = []  # each step's (5,) values, still on the device
        for n in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, lr, cfg.min_lr)
            micro = [next(batches) for _ in range(cfg.accum_iter)]
            pending.append(train_step(net, ddp, micro, optimizer, scaler, dtype, device, world, cfg.compile))
            step, seen = step + 1, seen + eff_batch
            logs = step % cfg.log_every == 0 or step == total
            if not (logs or n == steps_per_epoch - 1):
                continue
            # the steps since the last read, in one host-device sync (not one per step); NaN or a signal stops it
            (loss, loss_mim, loss_mlm), n_skipped = runs.read_steps(pending, step, epoch + 1, stop_note)
            skipped, pending = skipped + n_skipped, []
            if logs:
                now = time.perf_counter()
                speed, tick, seen = seen / (now - tick), now, 0
                last = {"step": step, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "loss": loss,
                        "loss_mim": loss_mim, "loss_mlm": loss_mlm, "images_per_s": speed,
                        **({"skipped_images": skipped} if skipped else {})}
                if main_process:
                    runs.append_log(log_path, last)
            bar.set_postfix(loss=f"{loss:.3f}", mim=f"{loss_mim:.4f}", mlm=f"{loss_mlm:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{speed:.0f}", refresh=False)
        bar.close()
        saves = (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs
        if saves:  # what is saved is checked, not only the losses (on every process: they all stop alike)
            runs.refuse_non_finite(model, f"step {step} (epoch {epoch + 1})", stop_note)
        if main_process:
            seconds = time.perf_counter() - epoch_start
            print(f"epoch {epoch + 1}/{cfg.epochs}: step {step}, loss {loss:.4f} (image {loss_mim:.4f}, "
                  f"report {loss_mlm:.4f}), {seconds:.0f} s, {steps_per_epoch * eff_batch / seconds:.0f} images/s"
                  + (f", {skipped} unreadable images skipped" if skipped else ""))
            if saves:
                save_checkpoint(ckpt_path, pretraining_state(model, optimizer, scaler, epoch + 1, step, cfg, mcfg, tok))
                pictures.save_recon(checks.reconstruct(model, dataset), tok, os.path.join(cfg.out, "recon.png"))
                pictures.pretraining_curves(log_path, os.path.join(cfg.out, "curves.png"))
            if (cfg.data == "synthetic" and cfg.fusion_check > 0 and cfg.fusion_every > 0
                    and (epoch + 1) % cfg.fusion_every == 0 and epoch + 1 < cfg.epochs):  # the end's check is below
                checks.logged_fusion_check(model, tok, cfg.fusion_check, cfg.seed, log_path, epoch + 1, step)
        stop_point(device)  # no rank runs ahead of the checkpoint; a Ctrl-C or SIGTERM during the epoch stops all here
    stop_at_step_boundaries(False)
    if main_process and cfg.data == "synthetic" and cfg.fusion_check > 0:
        last["fusion_check"] = checks.logged_fusion_check(model, tok, cfg.fusion_check, cfg.seed, log_path,
                                                          cfg.epochs, step, at_end=True)
    release(cfg.out)
    if dist.is_initialized():
        dist.destroy_process_group()
    return last


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
    if device.type == "cuda":  # naming the GPU binds NCCL to it (without, NCCL guesses it from the rank and warns)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()


def stop_point(device: torch.device):
    """An epoch's end: every process waits here for the checkpoint (a barrier), and all of them stop here if
    any was sent a Ctrl-C or SIGTERM meanwhile (its save finished first)."""
    if all_reduce_sum(torch.full((), float(stop_requested()), device=device)).item() > 0:
        raise KeyboardInterrupt


def broadcast(value):
    """Rank 0's `value` (any picklable object), on every rank."""
    if not dist.is_initialized():
        return value
    sent = [value]
    dist.broadcast_object_list(sent, src=0)
    return sent[0]


# -----------------------------------------------------------------------------
# Data and model


def model_sizes(cfg: TrainConfig, ckpt: dict | None) -> MRMConfig:
    """The sizes the data needs: a resumed run's from its checkpoint, else the preset's."""
    if ckpt is not None:
        return MRMConfig.from_dict(ckpt["model_config"])
    return MRMConfig.from_preset(cfg.preset, text_mask_ratio=cfg.text_mask_ratio)


def build_data(cfg: TrainConfig, mcfg: MRMConfig, ckpt: dict | None, rank: int):
    """Records, tokenizer and the Dataset. Returns (dataset, tokenizer)."""
    from tokenizers import Tokenizer

    hr = 2 * mcfg.img_size
    images, reports = data.run_records(cfg.data, cfg.image_root, cfg.num_records, hr, cfg.seed, cfg.skip_bad,
                                       verbose=rank == 0)
    if ckpt is not None:  # the tokenizer the run started with travels inside its checkpoint
        tok = Tokenizer.from_str(ckpt["tokenizer"])
    elif cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:  # built once (rank 0) and sent to the other ranks, in memory: train() writes it once all is checked
        if rank == 0:
            print(f"building a WordPiece vocabulary from {len(reports)} reports")
        tok = Tokenizer.from_str(broadcast(train_tokenizer(reports, cfg.vocab_size).to_str() if rank == 0 else None))
    dataset = data.PretrainDataset(images, data.encode_reports(tok, reports, mcfg.max_text_len), hr,
                                   (mcfg.img_size // mcfg.patch_size) ** 2, mcfg.text_mask_ratio,
                                   tok.token_to_id("[MASK]"), tok.token_to_id("[PAD]"), seed=cfg.seed,
                                   hflip=cfg.hflip, skip_bad=cfg.skip_bad, min_crop=cfg.min_crop)
    return dataset, tok


def model_config(cfg: TrainConfig, tok=None) -> MRMConfig:
    """The model's sizes and switches; the vocabulary's size and ids from `tok` (without it, the preset's)."""
    vocab = {} if tok is None else dict(vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"),
                                        mask_token_id=tok.token_to_id("[MASK]"))
    return MRMConfig.from_preset(
        cfg.preset, **vocab, mask_ratio=cfg.mask_ratio, text_mask_ratio=cfg.text_mask_ratio,
        mim_weight=cfg.mim_weight, mlm_weight=cfg.mlm_weight, super_resolution=cfg.super_resolution,
        fusion=cfg.fusion, fusion_tokens=cfg.fusion_tokens, norm_pix_loss=cfg.norm_pix_loss,
        multimodal_mim=cfg.multimodal_mim)


def build_loader(dataset, cfg: TrainConfig, world: int, rank: int, device: torch.device):
    """(sampler, DataLoader). The same sampler with or without torchrun: the data order is a function
    of (seed, epoch) only. Workers live across epochs (the dataset reads each new epoch from shared
    memory), and pinned batches copy to the GPU asynchronously."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    workers = runs.loader_workers(cfg.num_workers, device)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
    return sampler, loader


def build_optimizer(model, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) of the released main_pretrain.py, fused: one kernel over all parameters (4x faster than the
    default on this project's 2-core CPU: docs/performance.md), and with fp16 its GradScaler's inf check
    stays on the device."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=0.0, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu"))


def amp_dtype(cfg, device: torch.device):
    """None (fp32), bf16, or fp16 (which needs a GradScaler). 'auto': bf16 on a GPU that has it natively
    (Ampere and later), fp16 on older GPUs, fp32 on CPU."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


# -----------------------------------------------------------------------------
# Command line: the flags are TrainConfig's fields


def build_parser():
    # only the flags given, so that a resumed run can tell them from the saved ones
    return config_parser(TrainConfig, "train.py", __doc__, CHOICES, LIMITS, recipes.pretraining_help_default,
                         given_only=True)


# what each number may be: counts at least 1 (0 for workers and checks), shares within (0, 1), rates positive
LIMITS = {
    **dict.fromkeys(["vocab_size", "num_records", "epochs", "batch_size", "accum_iter", "save_every", "log_every"],
                    bounded(int, 1)),
    **dict.fromkeys(["num_workers", "seed", "fusion_check", "fusion_every"], bounded(int, 0)),
    "blr": bounded(float, 0, low_open=True), "min_crop": bounded(float, 0, 1, low_open=True),
    "mask_ratio": bounded(float, 0, 1, high_open=True), "text_mask_ratio": bounded(float, 0, 1, True, True),
    **dict.fromkeys(["warmup_epochs", "min_lr", "weight_decay", "mim_weight", "mlm_weight"], bounded(float, 0)),
}
CHOICES = {"preset": sorted(recipes.PRETRAINING), "amp": ["auto", "bf16", "fp16", "off"], "fusion": ["gap", "gmp"],
           "fusion_tokens": ["visible", "all"]}
# what a resumed run may change: how it runs, not what it learns (the batch and GPU count may change with
# the hardware: the lr follows the effective batch, the schedule continues at the saved epoch)
RESUME_MAY_CHANGE = {"resume", "out", "overwrite", "epochs", "batch_size", "accum_iter", "num_workers", "amp",
                     "compile", "save_every", "log_every", "skip_bad", "fusion_check", "fusion_every",
                     "trust_checkpoint", "dry_run"}


def parse_config(argv=None) -> tuple[TrainConfig, dict | None]:
    given = vars(build_parser().parse_args(argv))
    if not given.get("resume"):
        return TrainConfig(**given), None
    ckpt = load_checkpoint(given["resume"], bool(given.get("trust_checkpoint")))
    saved = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in fields(TrainConfig)} - {"overwrite"}}
    refused = sorted(runs.changed_settings(saved, given).keys() - RESUME_MAY_CHANGE)
    if refused:
        raise ConfigError(f"{given['resume']}: a resumed run keeps its model and data; cannot change {refused} "
                          "(start a new run, with --init to begin from these weights)")
    # a run folder may have been copied or moved since: the run continues where its checkpoint is now
    out = given.get("out", os.path.dirname(os.path.abspath(given["resume"])))
    return TrainConfig(**{**saved, **given, "out": out}), ckpt


def plan(cfg: TrainConfig, ckpt: dict | None = None) -> dict:
    """--dry_run: the settings train() would run with, resolved the same way, without reading an image. A
    CSV is counted (its rows), not checked against the images; the process count is torchrun's WORLD_SIZE."""
    cfg = recipes.fill_pretraining(TrainConfig(**asdict(cfg)))
    check_pretraining(cfg, model_sizes(cfg, ckpt), ckpt)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.data == "synthetic":
        records = cfg.num_records
    else:
        if not os.path.isfile(cfg.data):
            raise FileNotFoundError(f"{cfg.data}: no such CSV file")
        records = sum(1 for _, row in csv_rows(cfg.data) if row) - 1  # less the header
    if ckpt is not None:
        mcfg, vocab = MRMConfig.from_dict(ckpt["model_config"]), "from the checkpoint"
    else:
        mcfg = model_config(cfg, load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None)
        vocab = cfg.tokenizer or f"built from the training reports (up to {cfg.vocab_size})"
    steps_per_epoch = records // world // cfg.batch_size // cfg.accum_iter  # every sampler and loader drops the rest
    check_steps(steps_per_epoch, records, world, cfg.batch_size, cfg.accum_iter)
    eff_batch = cfg.batch_size * cfg.accum_iter * world
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = amp_dtype(cfg, device)
    return {"preset": cfg.preset, "data": cfg.data, "records": records, "processes": world,
            "effective_batch": eff_batch, "batch_per_process": cfg.batch_size, "accum_iter": cfg.accum_iter,
            "lr": cfg.blr * eff_batch / 256, "blr": cfg.blr, "steps_per_epoch": steps_per_epoch,
            "epochs": cfg.epochs, "start_epoch": ckpt["epoch"] if ckpt else 0,
            "total_steps": cfg.epochs * steps_per_epoch,
            "warmup_steps": round(cfg.warmup_epochs * steps_per_epoch), "crop": 2 * mcfg.img_size,
            "input": mcfg.img_size, "vocabulary": vocab, "init": cfg.init or "random",
            "precision": "fp32" if dtype is None else str(dtype).split(".")[-1], "device": str(device),
            "loader_workers": runs.loader_workers(cfg.num_workers, device),
            "model": {k: v for k, v in mcfg.to_dict().items()
                      if cfg.tokenizer or ckpt or k not in ("vocab_size", "pad_token_id", "mask_token_id")},
            "config": asdict(cfg)}


def main(argv=None):
    run = {}  # where the run writes, once known: what an interrupt's message tells

    def how_to_resume() -> str:  # a checkpoint this run wrote, or the one it continues
        kept = runs.resumable([os.path.join(run["cfg"].out, "ckpt.pt")], bool(run["cfg"].resume)) if run else []
        return runs.resume_hint(kept, f"{runs.launcher()} train.py --resume {kept[0]} --epochs {run['cfg'].epochs}"
                                if kept else "")

    with one_line_errors("train.py", NonFiniteLoss, interrupted=how_to_resume):
        try:
            cfg, ckpt = parse_config(argv)
            run["cfg"] = cfg
            if cfg.dry_run:
                print(json.dumps(plan(cfg, ckpt), allow_nan=False))
                return
            train(cfg, ckpt)
        finally:
            if dist.is_initialized():  # a stopped run leaves no process group behind
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
