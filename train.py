"""Pre-train MRM (Sec. 4.6; released main_pretrain.py, run.sh). The same script runs on a laptop and under torchrun:

    python train.py                                        # tiny model, synthetic records, CPU: minutes
    torchrun --nproc_per_node 4 train.py --preset base --data training.csv --image_root mimic-1024 \\
        --tokenizer mimic_wordpiece.json --init mae_pretrain_vit_base.pth   # the paper's run: 4 x 64 = 256

Read top to bottom: the settings (TrainConfig), the lr schedule, one step (the method), the loop (epochs,
steps, log, save), the distributed set-up, the data and the model, and the command line. What a run
promises beyond the method (its folder, resume, log, saves, a stop's advice) is its Run's (machinery/run.py).
Writes to --out: ckpt.pt (atomically, every --save_every epochs and at the end), log.jsonl, recon.png (the
paper's Fig. 3), curves.png (the losses and the lr so far) and tokenizer.json. On synthetic records the run
ends with the fusion check (checks.py): are held-out reports' masked words restored better from their film
than from noise? `--resume out/ckpt.pt` continues exactly where a run stopped.
"""
import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import checks
import data
import recipes
from machinery import settings
from machinery.run import Run
from mrm import MRM, MRMConfig, Switches


@dataclass
class TrainConfig(Switches):
    """train.py's flags. The model's switches (--mask_ratio, --mlm_weight, ... Tables 4 and 5) are
    mrm.Switches' fields, inherited; its sizes come from --preset (mrm.PRESETS)."""

    # data
    preset: str = "tiny"             # model size: tiny (CPU demo) or base (the paper's ViT-B/16)
    data: str = "synthetic"          # 'synthetic' (built in, no download) or a training.csv path
    image_root: str = ""             # folder the CSV's image_path values are relative to (default: the CSV's folder)
    tokenizer: str = ""              # tokenizers JSON or BERT vocab.txt; empty: build a WordPiece from the reports
    vocab_size: int = 30000          # of a vocabulary built here
    num_records: int | None = None   # synthetic records
    hflip: bool | None = None        # mirror half the crops (released); the demo does not: its reports name sides
    min_crop: float = 0.2            # smallest area share a random resized crop keeps (released: 0.2)
    text_mask_ratio: float = 0.5     # of the report tokens masked (Sec. 3.1)
    skip_bad: bool = False           # skip unreadable images and bad CSV rows (counted) instead of stopping
    # optimisation (Sec. 4.6, the released run.sh)
    epochs: int | None = None        # passes over the records
    warmup_epochs: float | None = None  # linear warm-up before the cosine
    batch_size: int | None = None    # per process (base: 4 GPUs x 64 = the paper's 256)
    accum_iter: int = 1              # micro-batches per optimizer step
    blr: float | None = None         # base lr for batch 256: lr = blr * effective batch / 256
    min_lr: float = 0.0              # where the cosine ends
    weight_decay: float | None = None  # AdamW's, on matrices only
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
# The lr schedule (Sec. 4.6): recipes.lr_at, warm-up then cosine, in the steps these numbers give


def schedule(cfg: TrainConfig, records: int, world: int) -> dict:
    """The effective batch, the lr scaled to it (lr = blr x batch / 256) and the schedule in optimizer steps.
    It runs in epochs: a resumed run on another batch or GPU count picks it up at its epoch. Every process's
    loader drops its last, incomplete batch."""
    steps = records // world // cfg.batch_size // cfg.accum_iter
    settings.check_steps(steps, records, world, cfg.batch_size, cfg.accum_iter)
    batch = cfg.batch_size * cfg.accum_iter * world
    return {"effective_batch": batch, "lr": cfg.blr * batch / 256, "steps_per_epoch": steps,
            "total_steps": cfg.epochs * steps, "warmup_steps": round(cfg.warmup_epochs * steps)}


# -----------------------------------------------------------------------------
# One step: the masks come from the data, the losses from the model (mrm.MRM.forward)


def train_step(net, ddp, micro: list[dict], optimizer, scaler, dtype, device, world: int,
               compiled: bool = False) -> dict:
    """One optimizer step over accumulation micro-batches. Returns tensors on the device: the step's loss,
    loss_mim and loss_mlm as means over the step and every process, and the unreadable images skipped.
    Nothing here waits for the device (no .item()), so the host queues the next step while the GPU runs this
    one; the run reads the values every --log_every steps. compiled: net is torch.compile's."""
    accum = len(micro)
    # The masked words of each micro-batch, (M,) flat positions, found on the host where the loader's
    # labels are: the GPU never has to count them (see MRM.forward).
    where = [torch.nonzero(b["labels"].flatten() != -100).squeeze(1) for b in micro]
    # Eq. 1 averages over the masked tokens of the whole step; reports differ in length, so each
    # micro-batch divides its summed cross entropy by the mean count per micro-batch over every
    # process and micro-step. Then 1 x 256, 4 x 64 and 4 x 32 x 2 take the same gradient.
    n_masked = torch.full((), float(sum(len(w) for w in where)), device=device)  # a fill, not a copy
    denominator = all_reduce_sum(n_masked) / (world * accum)
    sums = torch.zeros(4, device=device)  # a fill on the device: torch.tensor([...]) would wait for it
    for k, (b, w) in enumerate(zip(micro, where)):
        w = w.pin_memory() if device.type == "cuda" else w  # pinned: the copy to the GPU does not block
        w = w.to(device, non_blocking=True)
        if compiled:  # its length, the count of masked words, changes every step: torch.compile then
            # builds one graph for any length at once, instead of a graph for the first length and a
            # second, dynamic one right after (a length of 0 or 1 still gets a graph of its own)
            torch._dynamo.mark_dynamic(w, 0)
        # gradients are all-reduced once, after the last micro-batch
        with ddp.no_sync() if ddp is not None and k < accum - 1 else contextlib.nullcontext():
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
    sums = all_reduce_sum(sums)  # one all-reduce for the four
    return {"loss": sums[0] / world, "loss_mim": sums[1] / world, "loss_mlm": sums[2] / world, "skipped": sums[3]}


# -----------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, ckpt: dict | None, init: dict | None, run: Run) -> dict:
    """Pre-train, or continue the run in `ckpt`, with the settings resolve() gave; returns the last line logged."""
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    # data and model (a resumed run rebuilds both from its checkpoint); nothing is written before they are read
    dataset, tok, mcfg = build_data(cfg, ckpt, rank)
    plan = schedule(cfg, len(dataset), world)
    model = MRM(mcfg).to(device)
    if init is not None:  # --init's tensors (settings.encoder_weights); the rest as initialised
        model.encoder.load_state_dict(init, strict=False)
    optimizer = recipes.pretraining_optimizer(model, cfg.weight_decay, device)  # AdamW (0.9, 0.95), fused
    dtype = settings.amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    run.open({"tokenizer.json": tok.to_str(pretty=True)}, device, fp16=dtype == torch.float16)  # every check passed
    start = 0 if ckpt is None else ckpt["epoch"]
    if ckpt is not None:
        run.restore(ckpt, model, optimizer, scaler)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_initialized() else None
    net = torch.compile(ddp or model) if cfg.compile else ddp or model  # saved and drawn through `model`
    sampler, loader = build_loader(dataset, cfg, world, rank, device)
    if rank == 0:
        print(f"MRM {cfg.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(dataset)} "
              f"records, vocabulary {mcfg.vocab_size}, device {device}{'' if dtype is None else ' ' + str(dtype)[6:]}, "
              f"{world} process(es)\neffective batch {plan['effective_batch']} = {world} x {cfg.batch_size} x "
              f"{cfg.accum_iter}, lr {plan['lr']:.3g}, {plan['steps_per_epoch']} steps/epoch, "
              f"epochs {start}..{cfg.epochs}")
    step = start * plan["steps_per_epoch"]
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)  # the loader's workers start below, with this epoch's seed
        batches = iter(loader)
        for _ in run.steps(epoch, cfg.epochs, plan["steps_per_epoch"], plan["effective_batch"]):
            for group in optimizer.param_groups:
                group["lr"] = recipes.lr_at(step, plan["total_steps"], plan["warmup_steps"], plan["lr"], cfg.min_lr)
            losses = train_step(net, ddp, [next(batches) for _ in range(cfg.accum_iter)], optimizer, scaler, dtype,
                                device, world, cfg.compile)
            step += 1  # a NaN or a Ctrl-C stops the run at a read, after this step (every --log_every steps)
            run.log_step(step, losses, write=step % cfg.log_every == 0 or step == plan["total_steps"],
                         lr=optimizer.param_groups[0]["lr"])
        done = epoch + 1
        if done % cfg.save_every == 0 or done == cfg.epochs:
            run.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                      "epoch": done, "step": step, "config": asdict(cfg), "model_config": mcfg.to_dict(),
                      "tokenizer": tok.to_str()}, recon=checks.reconstruct(model, dataset) if rank == 0 else None)
        due = done == cfg.epochs or cfg.fusion_every and done % cfg.fusion_every == 0
        if rank == 0 and cfg.data == "synthetic" and cfg.fusion_check and due:
            check = checks.held_out_check(model, tok, cfg.fusion_check, cfg.seed, done, step, cfg.text_mask_ratio)
            # a check during the run names its epoch, so that a resumed run keeps those before its start
            run.log({"fusion_check": check} if done == cfg.epochs else {"epoch": done, "fusion_check": check})
        run.end_epoch()  # no process runs ahead of the save; a Ctrl-C or SIGTERM in the epoch stops all here
    return run.close()


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


def broadcast(value):
    """Rank 0's `value` (any picklable object), on every rank."""
    if not dist.is_initialized():
        return value
    sent = [value]
    dist.broadcast_object_list(sent, src=0)
    return sent[0]


# -----------------------------------------------------------------------------
# Data and model


def build_data(cfg: TrainConfig, ckpt: dict | None, rank: int):
    """Records, tokenizer and the Dataset, and the model's config. Returns (dataset, tokenizer, MRMConfig)."""
    from tokenizers import Tokenizer

    sizes = MRMConfig.from_dict(ckpt["model_config"]) if ckpt is not None else MRMConfig.from_preset(cfg.preset)
    hr = 2 * sizes.img_size
    images, reports = data.run_records(cfg.data, cfg.image_root, cfg.num_records, hr, cfg.seed, cfg.skip_bad,
                                       verbose=rank == 0)
    if ckpt is not None:  # the tokenizer the run started with travels inside its checkpoint
        tok = Tokenizer.from_str(ckpt["tokenizer"])
    elif cfg.tokenizer:
        tok = data.vocabulary(cfg.tokenizer)
    else:  # built once (rank 0) and sent to the other ranks, in memory: the run writes it once all is checked
        if rank == 0:
            print(f"building a WordPiece vocabulary from {len(reports)} reports")
        built = data.vocabulary("", reports, cfg.vocab_size).to_str() if rank == 0 else None
        tok = Tokenizer.from_str(broadcast(built))
    mcfg = sizes if ckpt is not None else model_config(cfg, tok)
    dataset = data.PretrainDataset(images, data.encode_reports(tok, reports, mcfg.max_text_len), hr,
                                   (mcfg.img_size // mcfg.patch_size) ** 2, cfg.text_mask_ratio,
                                   tok.token_to_id("[MASK]"), tok.token_to_id("[PAD]"), seed=cfg.seed,
                                   hflip=cfg.hflip, skip_bad=cfg.skip_bad, min_crop=cfg.min_crop)
    return dataset, tok, mcfg


def model_config(cfg: TrainConfig, tok=None) -> MRMConfig:
    """The preset's sizes, the switches of `cfg`, and the vocabulary's size and ids from `tok` (else the preset's)."""
    vocab = {} if tok is None else dict(vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"),
                                        mask_token_id=tok.token_to_id("[MASK]"))
    return MRMConfig.from_preset(cfg.preset, **vocab, **{f.name: getattr(cfg, f.name) for f in fields(Switches)})


def build_loader(dataset, cfg: TrainConfig, world: int, rank: int, device: torch.device):
    """(sampler, DataLoader). The same sampler with or without torchrun: the data order is a function
    of (seed, epoch) only. Workers live across epochs (the dataset reads each new epoch from shared
    memory), and pinned batches copy to the GPU asynchronously."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    workers = settings.loader_workers(cfg.num_workers, device)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
    return sampler, loader


# -----------------------------------------------------------------------------
# Command line: the flags are TrainConfig's fields


def build_parser():
    # only the flags given, so that a resumed run can tell them from the saved ones
    return settings.config_parser(TrainConfig, "train.py", __doc__, CHOICES, LIMITS, recipes.pretraining_help_default,
                                  given_only=True)


# what each number may be: counts at least 1 (0 for workers and checks), shares within (0, 1), rates positive
bounded = settings.bounded
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


def resolve(argv: list[str] | None, run: Run) -> tuple[TrainConfig, dict | None, dict | None]:
    """The settings of a run and of its --dry_run, resolved the one way: the flags given, over a resumed run's
    own (--resume), over the preset's recipe; each refused in one line, before anything is read or written,
    if it cannot work. Returns (cfg, the checkpoint a resumed run continues, the --init weights)."""
    given = vars(build_parser().parse_args(argv))
    with contextlib.redirect_stdout(sys.stderr) if given.get("dry_run") else contextlib.nullcontext():  # the plan
        ckpt = run.resumed(given.get("resume"), given.get("trust_checkpoint", False))
        if ckpt is not None:  # a run folder may have been copied or moved: the run goes on where its checkpoint is
            saved = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in fields(TrainConfig)}}
            given = {**saved, "overwrite": False, **given,
                     "out": given.get("out", os.path.dirname(os.path.abspath(given["resume"])))}
        cfg = recipes.fill_pretraining(TrainConfig(**given))
        sizes = MRMConfig.from_dict(ckpt["model_config"]) if ckpt is not None else MRMConfig.from_preset(cfg.preset)
        run.check(cfg, ckpt)  # what a resumed run changes, and the folder
        settings.check_pretraining(cfg, sizes, ckpt)
        init = None if ckpt is not None or not cfg.init else \
            settings.encoder_weights(cfg.init, sizes, sizes.img_size, cfg.trust_checkpoint)
    return cfg, ckpt, init


def plan(cfg: TrainConfig, ckpt: dict | None = None) -> dict:
    """--dry_run: what train() would run with, from resolve()'s settings, without reading an image. A CSV is
    counted (its rows), not checked against the images; the process count is torchrun's WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    records = data.count_records(cfg.data, cfg.num_records)
    if ckpt is not None:
        mcfg, vocab = MRMConfig.from_dict(ckpt["model_config"]), "from the checkpoint"
    else:
        mcfg = model_config(cfg, data.vocabulary(cfg.tokenizer) if cfg.tokenizer else None)
        vocab = cfg.tokenizer or f"built from the training reports (up to {cfg.vocab_size})"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.amp_dtype(cfg.amp, device)
    return {"preset": cfg.preset, "data": cfg.data, "records": records, "processes": world,
            "batch_per_process": cfg.batch_size, "accum_iter": cfg.accum_iter, "blr": cfg.blr,
            **schedule(cfg, records, world), "epochs": cfg.epochs, "start_epoch": ckpt["epoch"] if ckpt else 0,
            "crop": 2 * mcfg.img_size, "input": mcfg.img_size, "vocabulary": vocab, "init": cfg.init or "random",
            "precision": "fp32" if dtype is None else str(dtype)[6:], "device": str(device),
            "loader_workers": settings.loader_workers(cfg.num_workers, device),
            "model": {k: v for k, v in mcfg.to_dict().items()
                      if cfg.tokenizer or ckpt or k not in ("vocab_size", "pad_token_id", "mask_token_id")},
            "config": asdict(cfg)}


def main(argv=None):
    with Run("train.py") as run:  # however it ends: one line for an expected error or a stop, the folder let go
        try:
            cfg, ckpt, init = resolve(argv, run)
            if cfg.dry_run:
                print(json.dumps(plan(cfg, ckpt), allow_nan=False))
            else:
                train(cfg, ckpt, init, run)
        finally:
            if dist.is_initialized():  # a stopped run leaves no process group behind
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
