"""A candidate for the loader's cost, never adopted: the crop's resize done on the training device instead.

If the loader shipped each crop as decoded (images.decode_crop's box, cut out) and the training device resized
it, what would the loader spend a record on one core (the cut, beside images.resize_box), what would it ship,
and what would the device spend on a batch of such crops, one resize_on_device each, copies included? Prints one
JSON line; docs/performance.md has what it measured.

    python experiments/resize.py --image cxr.jpg          # default: a synthetic 1,024-px JPEG
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from bench import environment  # noqa: E402
from machinery import images, synthetic  # noqa: E402
from machinery.console import one_line_errors  # noqa: E402
from machinery.settings import OneLineParser, bounded  # noqa: E402


def resize_on_device(crop: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
    """A (h, w) uint8 crop, on any device, to (size, size) uint8: images.resize_box's two passes (along the rows,
    then the columns, rounded to uint8 in between) in float, the only dtype CUDA's antialiased bicubic
    takes. Each call leaves the other axis as it is (bicubic at scale 1 is the identity). Within 2 gray
    levels of resize_box, about 0.005 on average (tested)."""
    x = crop.float()[None, None]
    x = F.interpolate(x, (crop.shape[0], size), mode="bicubic", antialias=True).round_().clamp_(0, 255)
    x = F.interpolate(x, (size, size), mode="bicubic", antialias=True).round_().clamp_(0, 255)
    return (x.flip(-1) if flip else x)[0, 0].to(torch.uint8)


def bench_resize(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(1)  # the loader's side: one core's work (on a CPU device, the resizes too)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.image
        if not path:  # a synthetic 1,024-px film, JPEG as the recommended MIMIC-CXR copy
            path = os.path.join(tmp, "film.jpg")
            Image.fromarray(synthetic.synth_record(0, 1024)["image"]).save(path, quality=95)
        rng = np.random.default_rng(0)
        records = []
        for _ in range(args.batch_size):  # the draws of data.load_crop: box, then mirror
            img, box = images.decode_crop(path, args.size, lambda w, h: data.random_resized_crop_box(w, h, rng))
            records.append((img, box, data.coin_flip(rng, True)))
        with Image.open(path) as img:
            image_size = img.size

    def cut(img, box):  # what the loader would ship: the box of the decoded film, as a tensor
        left, top, right, bottom = box
        return torch.from_numpy(np.array(images.pixels(img)[top:bottom, left:right]))

    loader_ms = {"cut": [], "resize_box": []}
    for _ in range(args.rounds):  # one core, as bench.py data; alternating
        for name, run in (("cut", lambda r: cut(*r[:2])),
                          ("resize_box", lambda r: images.resize_box(*r[:2], args.size, r[2]))):
            start = time.perf_counter()
            for r in records:
                run(r)
            loader_ms[name].append((time.perf_counter() - start) * 1e3 / len(records))
    crops = [cut(img, box) for img, box, _ in records]
    if device.type == "cuda":
        crops = [c.pin_memory() for c in crops]
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = torch.stack([resize_on_device(c.to(device, non_blocking=True), args.size, flip)
                           for c, (_, _, flip) in zip(crops, records)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    expected = torch.from_numpy(np.stack([images.resize_box(img, box, args.size, flip)
                                          for img, box, flip in records]))
    diff = (out.cpu().int() - expected.int()).abs()
    batch_ms = sorted(times)[len(times) // 2]
    return {"bench": "resize", "image": args.image or "synthetic 1,024-px film", "image_size": image_size,
            "crop": args.size, "batch_size": args.batch_size,
            "loader_cut_ms": round(min(loader_ms["cut"]), 3),  # per record, one core (best round)
            "loader_resize_box_ms": round(min(loader_ms["resize_box"]), 3),
            "shipped_kb_per_record": round(sum(c.numel() for c in crops) / len(crops) / 1024, 1),
            "resized_kb_per_record": round(args.size ** 2 / 1024, 1),
            "device_ms_per_batch": round(batch_ms, 2),  # median of the timed steps
            "device_ms_per_record": round(batch_ms / args.batch_size, 3),
            "max_diff": int(diff.max()), "mean_diff": round(float(diff.float().mean()), 4), **environment(device)}


def main(argv=None) -> dict:
    parser = OneLineParser(prog="experiments/resize.py", description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image", default="", help="a film (default: a synthetic 1,024-px JPEG)")
    parser.add_argument("--batch_size", type=bounded(int, 1), default=64)
    parser.add_argument("--size", type=bounded(int, 1), default=448, help="crop size")
    parser.add_argument("--rounds", type=bounded(int, 1), default=3, help="rounds of the loader's side, one core")
    parser.add_argument("--warmup", type=bounded(int, 0), default=3)
    parser.add_argument("--steps", type=bounded(int, 0), default=10, help="timed batches on the device")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    with one_line_errors("experiments/resize.py"):
        result = bench_resize(args)
        print(json.dumps(result))
        return result


if __name__ == "__main__":
    main()
