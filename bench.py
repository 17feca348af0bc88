"""How fast MRM pre-trains: the step, the image pipeline, the loader. Each prints one JSON line.

    python bench.py step --preset base --batch_size 64 --dtype bf16 --compile --peak_tflops 989
    python bench.py step --preset tiny --batch_size 32                  # runs on a CPU in seconds
    python bench.py step --preset base --batch_size 64 --dtype bf16 --steps 0   # FLOPs and memory only
    python bench.py data --image cxr.jpg                                # one core: ours and the released pipeline
    python bench.py loader --data training.csv --image_root DIR --num_workers 8
    python bench.py loader --num_workers 2                              # the built-in synthetic records

`step` times train.train_step (forward, backward, optimizer) on synthetic batches, after warm-up.
`data` times one image on one core, the same file over and over: ours (data.load_crop) beside, in the same run, the
bare decode, ours without its decode and the released recipe, so their ratios hold on a busy machine too; what its
fields mean: docs/performance.md. `loader` runs train.py's DataLoader end to end (images + tokenized, masked reports).
"""
import argparse
import json
import os
import platform
import resource
import tempfile
import time

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
import recipes
import train
from machinery import images
from machinery.console import one_line_errors
from machinery.settings import OneLineParser, bounded
from mrm import MRM, MRMConfig


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        names = []
        if os.path.exists("/proc/cpuinfo"):  # Linux
            names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        env.update(cpu=names[0] if names else platform.processor() or platform.machine(), cores=cores)
    return env


# -----------------------------------------------------------------------------
# step: the training step on synthetic batches


def synthetic_batch(cfg: MRMConfig, batch_size: int, rng) -> dict:
    """A batch as the loader gives it: uint8 images (B, 1, 2H, 2W), full-length reports (MIMIC-CXR's
    FINDINGS + IMPRESSION mostly fill the 100 tokens) masked by data.mask_report, mask noise (B, L)."""
    hr, T = 2 * cfg.img_size, cfg.max_text_len
    ids = rng.integers(4, cfg.vocab_size, (batch_size, T))
    ids[:, 0] = 2  # [CLS]
    masked = [data.mask_report(r, 0.5, rng, cfg.mask_token_id, cfg.pad_token_id) for r in ids]
    return {"image": torch.from_numpy(rng.integers(0, 256, (batch_size, 1, hr, hr), dtype=np.uint8)),
            "tokens": torch.from_numpy(np.stack([t for t, _ in masked])),
            "labels": torch.from_numpy(np.stack([l for _, l in masked])),
            "noise": torch.from_numpy(rng.random((batch_size, (cfg.img_size // cfg.patch_size) ** 2), np.float32)),
            "skipped": torch.zeros(batch_size, dtype=torch.int64)}


# the released WordPiece vocabulary (base); the one `python train.py` builds from the synthetic reports (tiny)
VOCAB = {"base": 30000, "tiny": 153}


def saved_for_backward(model, batch: dict, device, dtype) -> int:
    """Bytes autograd keeps from one eager forward for the backward (activations, autocast's weight copies; a storage
    once): nearly the same on any device for one dtype, so a CPU sizes a GPU's batch (docs/performance.md)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(batch["image"].to(device), batch["tokens"].to(device), batch["labels"].to(device),
                  noise=batch["noise"].to(device))
    return sum(kept.values())


def bench_step(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MRMConfig.from_preset(args.preset, vocab_size=args.vocab_size or VOCAB[args.preset])
    model = MRM(cfg).to(device)
    optimizer = recipes.pretraining_optimizer(model, 0.05, device)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    net = torch.compile(model) if args.compile else model  # as train.py does
    # a few different batches: reports differ in their count of masked words, as in training
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(cfg, args.batch_size, rng) for _ in range(4)]
    if device.type == "cuda":  # the loader pins its batches
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]

    # FLOPs per record of one forward + backward on up to 8 records, on the eager model (the same arithmetic compiled)
    b = {k: v[:8].to(device) for k, v in batches[0].items()}
    with FlopCounterMode(display=False) as counter:
        model(b["image"], b["tokens"], b["labels"], noise=b["noise"])["loss"].backward()
    model.zero_grad(set_to_none=True)
    gflop_per_img = counter.get_total_flops() / len(b["image"]) / 1e9
    # Memory, counted: what the eager model saves for its backward (--compile too) on 2 and 4 records, extrapolated
    # to the batch, and fp32 weights + AdamW's moments (12 bytes a parameter); an eager peak is at least their sum.
    probe = synthetic_batch(cfg, 4, np.random.default_rng(1))
    two, four = (saved_for_backward(model, {k: v[:n] for k, v in probe.items()}, device, dtype) for n in (2, 4))
    saved = two + (args.batch_size - 2) * (four - two) / 2
    weights_and_adam = 12 * sum(p.numel() for p in model.parameters())

    result = {"bench": "step", "preset": args.preset, "batch_size": args.batch_size, "dtype": args.dtype,
              "vocab_size": cfg.vocab_size, "compile": args.compile, "gflop_per_img": round(gflop_per_img, 2),
              "saved_for_backward_eager_gb": round(saved / 2**30, 3),
              "weights_and_adam_gb": round(weights_and_adam / 2**30, 3)}
    if args.steps == 0:  # the counts only: sizing a GPU's batch from a CPU takes seconds, not a base step
        return {**result, **environment(device)}

    def steps(n):
        loss = torch.zeros(())
        for i in range(n):
            loss = train.train_step(net, None, [batches[i % len(batches)]], optimizer, scaler, dtype, device, 1,
                                    args.compile)["loss"]
        return loss.item()  # waits for the device

    warm = time.perf_counter()
    steps(args.warmup)
    warmup_s = time.perf_counter() - warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    loss = steps(args.steps)
    step_s = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak, peak_of = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, peak_of = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    img_per_s = args.batch_size / step_s
    if args.profile:  # where the time goes: the top kernels (or CPU ops) of a few more steps
        print(profile_table(lambda: steps(args.profile), device), flush=True)
    return {**result, "img_per_s": round(img_per_s, 2), "step_ms": round(1e3 * step_s, 2),
            "peak_mem_gb": round(peak / 2**30, 3), "peak_mem_of": peak_of,
            "mfu": round(gflop_per_img * img_per_s / (1e3 * args.peak_tflops), 4) if args.peak_tflops else None,
            "warmup_s": round(warmup_s, 1), "loss": round(loss, 4), **environment(device)}


def profile_table(run, device: torch.device, rows: int = 15) -> str:
    """torch.profiler's table of the ops and kernels that took the most device time while run() ran."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


# -----------------------------------------------------------------------------
# data: one record's image, on one core

PIXEL_MEAN, PIXEL_STD = 0.4978, 0.2449


def released_pipeline(path, size: int, rng) -> torch.Tensor:
    """The released torchvision transforms step for step in PIL and numpy (docs/performance.md): (3, S, S) float32."""
    with Image.open(path) as f:
        img = f.convert("RGB")
    img = img.crop(data.random_resized_crop_box(*img.size, rng)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    gray = np.array(img.convert("L"))
    img = Image.fromarray(np.dstack([gray, gray, gray]), "RGB")
    x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
    return x.sub_(PIXEL_MEAN).div_(PIXEL_STD)


def bare_decode(path):
    """The floor of any loader with PIL: the bare gray decode at full size (`draft('L', size)`), nothing after."""
    with Image.open(path) as img:
        img.draft("L", img.size)
        img.load()


def resize_only(path, size: int):
    """load_crop without its decode (the film decoded beforehand at each draft_scale), as a function of rng."""
    def run(rng):
        box = data.random_resized_crop_box(width, height, rng)
        img, scale = decoded[images.draft_scale(box, size)]
        return images.resize_box(img, tuple(round(v / scale) for v in box), size, data.coin_flip(rng, True))

    decoded = {}
    for s in (1, 2, 4, 8):  # every scale beforehand: no decode in a timed call
        with Image.open(path) as img:
            width, height = img.size
            decoded[s] = images.decode_reduced(img, s)
    return run


def bench_data(args) -> dict:
    core = None
    if hasattr(os, "sched_setaffinity"):  # Linux: one core for this process; elsewhere one thread only
        core = args.core if args.core is not None else max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    files = data.ImageFiles([os.path.basename(args.image)], os.path.dirname(os.path.abspath(args.image)))
    pipelines = {  # ours: exactly what PretrainDataset does with an image file, (1, S, S) uint8
        "decode": lambda rng: bare_decode(args.image),
        "ours": lambda rng: torch.from_numpy(np.ascontiguousarray(files.load_crop(0, args.size, rng)))[None],
        "resize": resize_only(args.image, args.size),
        "released": lambda rng: released_pipeline(args.image, args.size, rng)}
    rates = {name: [] for name in pipelines}
    for _ in range(args.rounds):  # alternate, so all four see the same background load
        for name, run in pipelines.items():
            rng = np.random.default_rng(0)  # ours, the resize alone and the released pipeline: the same crops
            run(rng)
            start = time.perf_counter()
            for _ in range(args.n):
                run(rng)
            rates[name].append(args.n / (time.perf_counter() - start))
    best = {name: max(r) for name, r in rates.items()}  # a busy machine only ever slows a round down
    with Image.open(args.image) as img:
        size = img.size
    return {"bench": "data", "image": args.image, "image_size": size, "crop": args.size,
            "img_per_s_per_core": round(best["ours"], 1), "released_img_per_s_per_core": round(best["released"], 1),
            "speedup": round(best["ours"] / best["released"], 2), "decode_img_per_s_per_core": round(best["decode"], 1),
            "overhead_ms": round(1e3 / best["ours"] - 1e3 / best["decode"], 2),
            "share_of_decode": round(best["ours"] / best["decode"], 2), "resize_ms": round(1e3 / best["resize"], 2),
            "rounds": {name: [round(v, 1) for v in r] for name, r in rates.items()}, "n": args.n,
            "core": core, **environment(torch.device("cpu"))}


# -----------------------------------------------------------------------------
# loader: train.py's DataLoader end to end


def bench_loader(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as out:  # an --out of its own (build_data writes nothing into it)
        cfg = recipes.fill_pretraining(train.TrainConfig(preset=args.preset, data=args.data, image_root=args.image_root,
                                              tokenizer=args.tokenizer, num_records=args.num_records,
                                              batch_size=args.batch_size, num_workers=args.num_workers, out=out))
        dataset, _, sizes = train.build_data(cfg, None, rank=0)
    sampler, loader = train.build_loader(dataset, cfg, 1, 0, device)
    start = time.perf_counter()
    first, records, epoch = None, 0, 0
    while records < args.records:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            if first is None:  # worker start-up and the first batch are timed apart
                first = time.perf_counter() - start
                start = time.perf_counter()
            else:
                records += len(batch["image"])
            if records >= args.records:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    return {"bench": "loader", "data": args.data, "preset": args.preset, "crop": 2 * sizes.img_size,
            "num_workers": args.num_workers, "batch_size": cfg.batch_size, "records": records,
            "records_per_s": round(records / seconds, 1), "first_batch_s": round(first, 2), **environment(device)}


def main(argv=None) -> dict:
    parser = OneLineParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("step", help="the training step on synthetic batches",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="base", choices=["base", "tiny"])
    p.add_argument("--batch_size", type=bounded(int, 1), default=64)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--vocab_size", type=bounded(int, 1), default=None,
                   help="default: base 30000 (the released WordPiece), tiny 153 (what python train.py builds from the "
                   "synthetic reports)")
    p.add_argument("--warmup", type=bounded(int, 0), default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=bounded(int, 0), default=20, help="timed steps (0: only count FLOPs and memory)")
    p.add_argument("--peak_tflops", type=bounded(float, 0, low_open=True), default=None,
                   help="the device's peak, for mfu (H100 SXM bf16: 989)")
    p.add_argument("--threads", type=bounded(int, 1), default=None,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--profile", type=bounded(int, 0), default=0,
                   help="then profile this many steps and print the top kernels")
    p = sub.add_parser("data", help="one record's image pipeline on one core: ours, the bare decode, the released one",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--n", type=bounded(int, 1), default=200, help="images per round and pipeline")
    p.add_argument("--rounds", type=bounded(int, 1), default=3)
    p.add_argument("--size", type=bounded(int, 1), default=448, help="crop size")
    p.add_argument("--core", type=bounded(int, 0), default=None, help="CPU core to run on (default: the last one)")
    p = sub.add_parser("loader", help="train.py's DataLoader end to end",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="synthetic", help="training.csv, or 'synthetic'")
    p.add_argument("--image_root", default="", help="default: the CSV's folder")
    p.add_argument("--tokenizer", default="", help="default: build one from the reports")
    p.add_argument("--preset", default="base", choices=["base", "tiny"], help="sets the crop: 448 or 128")
    p.add_argument("--num_records", type=bounded(int, 1), default=None,
                   help="synthetic records (default: the preset's)")
    p.add_argument("--batch_size", type=bounded(int, 1), default=64)
    p.add_argument("--num_workers", type=bounded(int, 0), default=2)
    p.add_argument("--records", type=bounded(int, 1), default=2000, help="records to time, after the first batch")
    args = parser.parse_args(argv)
    with one_line_errors("bench.py"):
        if args.command == "step":
            args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
        result = {"step": bench_step, "data": bench_data, "loader": bench_loader}[args.command](args)
        print(json.dumps(result))
        return result


if __name__ == "__main__":
    main()
