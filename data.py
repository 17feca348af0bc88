"""Records for MRM pre-training: what MRM does to a radiograph and its report before the model sees them. In order:
  1. the report: 100 WordPiece ids, [CLS] first, about half the words masked (Sec. 3.1);
  2. the film: a random resized crop to 448, bicubic, then a coin-flip mirror (released main_pretrain.py);
  3. the Dataset train.py reads, each sample drawn from (seed, epoch, index) alone, and the records of a run
     (the built-in synthetic ones, or the released training.csv).
Behind them, in machinery/: tokenizer.py (WordPiece), images.py (image formats, the fast crop), records.py (CSV
checks), synthetic.py. prepare.py prepares real data, finetune_data.py is fine-tuning's. Images stay uint8 until the
training device (mrm.MRM.prepare_images: floats, normalised, 3 channels): the loader moves a quarter of the bytes.
"""
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

from machinery import synthetic
from machinery.errors import BadRecord
from machinery.images import decode_crop, load_image, named_errors, resize_box
from machinery.records import csv_rows, training_csv_rows
from machinery.tokenizer import load_tokenizer, train_tokenizer


# -----------------------------------------------------------------------------
# 1. The report: WordPiece tokens, [CLS] first, 100 ids, masked (Sec. 3.1)


def encode_reports(tok, reports, max_len: int = 100) -> np.ndarray:
    """(N, max_len) int32: [CLS] + the report's first max_len - 1 word pieces, then [PAD]."""
    cls, pad = tok.token_to_id("[CLS]"), tok.token_to_id("[PAD]")
    out = np.full((len(reports), max_len), pad, dtype=np.int32)
    out[:, 0] = cls
    for n, enc in enumerate(tok.encode_batch(list(reports), add_special_tokens=False)):
        ids = enc.ids[: max_len - 1]
        out[n, 1:1 + len(ids)] = ids
    return out


def vocabulary(path: str = "", reports=(), size: int = 30000):
    """The reports' WordPiece vocabulary: the file at `path` (a tokenizers JSON such as the released
    mimic_wordpiece.json, or a BERT vocab.txt), or without one, built from the reports, the same every time."""
    return load_tokenizer(path) if path else train_tokenizer(reports, size)


def mask_report(ids: np.ndarray, ratio: float, rng, mask_id: int, pad_id: int):
    """Sec. 3.1: each real token (not [CLS] at 0, not [PAD]) becomes [MASK] with probability `ratio`, at least one
    per report (no BERT 80/10/10 split). Returns tokens and labels (-100 = not scored)."""
    real = ids != pad_id
    real[0] = False
    if not real.any():
        raise BadRecord("a report with no token to mask")
    chosen = real & (rng.random(len(ids)) < ratio)
    if not chosen.any():
        chosen[rng.choice(np.flatnonzero(real))] = True
    return np.where(chosen, mask_id, ids), np.where(chosen, ids, -100)


# -----------------------------------------------------------------------------
# 2. The film (released main_pretrain.py: RandomResizedCrop(448, scale 0.2-1, bicubic) + horizontal flip)


def random_resized_crop_box(width: int, height: int, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """A crop box (left, top, right, bottom) covering `scale` of the area with aspect in `ratio`; ten tries, then the
    centre crop of the clamped aspect (the usual RandomResizedCrop recipe)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def augment(img: Image.Image, size: int, rng, hflip: bool = True, min_crop: float = 0.2) -> np.ndarray:
    """Random resized crop to (size, size) uint8 (bicubic, antialiased when shrinking; min_crop: the smallest share
    of the area kept, released 0.2), then a coin-flip mirror. Mirroring swaps the heart's side while the report
    still says 'left' (the released recipe; train.py --no-hflip keeps laterality)."""
    box = random_resized_crop_box(*img.size, rng, (min_crop, 1.0))
    return resize_box(img, box, size, coin_flip(rng, hflip))


def coin_flip(rng, hflip: bool) -> bool:
    """Mirror this crop? Half the time with hflip; drawn after the crop box, as the released transforms run
    (RandomResizedCrop, then RandomHorizontalFlip; main_pretrain.py)."""
    return hflip and rng.random() < 0.5


def load_crop(path, size: int, rng, hflip: bool = True, min_crop: float = 0.2) -> np.ndarray:
    """augment(load_image(path), size, rng, hflip, min_crop), the same draws, but a JPEG is decoded only as finely
    as its crop needs (machinery/images.py)."""
    path = str(path)
    with named_errors(path):
        img, box = decode_crop(path, size, lambda w, h: random_resized_crop_box(w, h, rng, (min_crop, 1.0)))
        return resize_box(img, box, size, coin_flip(rng, hflip))


def full_view(img: Image.Image, size: int) -> np.ndarray:
    """The whole image resized to size x size as training resizes a crop, no randomness: for pictures and checks."""
    return resize_box(img, (0, 0, *img.size), size)


# -----------------------------------------------------------------------------
# 3. The Dataset, and the records of a run


class PretrainDataset(torch.utils.data.Dataset):
    """Sample i of an epoch: the augmented image (1, S, S) uint8, the masked report (tokens, labels), and the
    noise (L,) that decides its image mask.

    Every random choice comes from a generator seeded with (seed, epoch, i), so a sample does not depend on the
    process, worker or batch that draws it: runs resume exactly, and 1 process x 256 and 4 processes x 64 see the
    same samples. Call set_epoch before each epoch's loader. With skip_bad, an unreadable image is replaced by the
    next record's and counted in 'skipped'."""

    def __init__(self, images, tokens: np.ndarray, crop_size: int, num_patches: int, text_mask_ratio: float,
                 mask_id: int, pad_id: int, seed: int = 0, hflip: bool = True, skip_bad: bool = False,
                 min_crop: float = 0.2):
        self.images, self.tokens, self.seed, self.skip_bad = images, tokens, seed, skip_bad
        self.crop_size, self.min_crop, self.hflip, self.num_patches = crop_size, min_crop, hflip, num_patches
        self.text_mask_ratio, self.mask_id, self.pad_id = text_mask_ratio, mask_id, pad_id
        # in shared memory: DataLoader workers that persist across epochs (train.py) read the new epoch
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        empty = np.flatnonzero(tokens[:, 1] == pad_id)  # nothing after [CLS]: nothing to mask
        if len(empty):
            raise BadRecord(f"{len(empty)} reports have no token: " + "; ".join(images.where(i) for i in empty[:5]))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int):
        self._epoch.fill_(epoch)

    def __len__(self):
        return len(self.images)

    def load(self, i: int, rng=None):
        """(image, its index, records skipped): record i's, or with skip_bad the next readable one's. The whole PIL
        image, or with rng the training view, (S, S) uint8."""
        for skipped in range(len(self)):
            j = (i + skipped) % len(self)
            try:
                if rng is None:
                    return self.images.load(j), j, skipped
                return self.images.load_crop(j, self.crop_size, rng, self.hflip, self.min_crop), j, skipped
            except BadRecord as e:
                if not self.skip_bad:
                    raise
                print(f"skipping: {e}", file=sys.stderr)
        raise BadRecord("no readable image in the whole dataset")

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img, j, skipped = self.load(i, rng)  # crop and flip are drawn first: a JPEG is decoded for its crop
        tokens, labels = mask_report(self.tokens[j], self.text_mask_ratio, rng, self.mask_id, self.pad_id)
        return {"image": torch.from_numpy(np.ascontiguousarray(img))[None],  # a copy only if not contiguous
                "tokens": torch.from_numpy(tokens.astype(np.int64)),
                "labels": torch.from_numpy(labels.astype(np.int64)),
                "noise": torch.from_numpy(rng.random(self.num_patches, dtype=np.float32)),
                "skipped": skipped}


# The images of a run: the built-in synthetic records, or files listed by training.csv


def run_records(source: str, image_root: str, n: int, hr: int, seed: int, skip_bad: bool, verbose: bool = True):
    """A run's images and reports: `source` 'synthetic' (records 0..n-1, rendered at twice the crop, up to 512 px)
    or a training.csv path (images under image_root, by default the CSV's folder)."""
    if source == "synthetic":
        return SyntheticImages(n, size=min(2 * hr, 512), seed=seed), [synthetic.synth_report(i, seed) for i in range(n)]
    images, reports, n_bad = read_training_csv(source, image_root or os.path.dirname(os.path.abspath(source)), skip_bad)
    if n_bad and verbose:
        print(f"skipped {n_bad} bad rows of {source}")
    return images, reports


def count_records(source: str, n: int | None) -> int:
    """What train.py --dry_run counts: the synthetic records asked for, or a training.csv's rows (not its images)."""
    return n if source == "synthetic" else sum(1 for _, row in csv_rows(source) if row) - 1  # less the header


class SyntheticImages(synthetic.SyntheticFilms):
    """Synthetic records 0..n-1 as pre-training reads them: kept in memory up to cache_mb, each epoch only crops."""

    def __init__(self, n: int, size: int, seed: int = 0, cache_mb: int = 512):
        super().__init__(0, n, size, seed=seed, cache_mb=cache_mb)

    def load_crop(self, i: int, size: int, rng, hflip: bool = True, min_crop: float = 0.2) -> np.ndarray:
        return augment(self.load(i), size, rng, hflip, min_crop)


class ImageFiles:
    """Image files named relative to `root`; `where` names the file and its CSV line for errors."""

    def __init__(self, paths, root, csv_path=None, lines=None):
        # a numpy byte array, not a list of str: DataLoader workers then share it without copying
        self.paths = np.array([os.fsencode(p) for p in paths])
        self.root, self.csv_path, self.lines = str(root), csv_path, lines

    def __len__(self):
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    def load(self, i: int) -> Image.Image:
        try:
            return load_image(self.path(i))
        except BadRecord as e:
            raise BadRecord(f"{e} [{self.where(i)}]") from None

    def load_crop(self, i: int, size: int, rng, hflip: bool = True, min_crop: float = 0.2) -> np.ndarray:
        try:
            return load_crop(self.path(i), size, rng, hflip, min_crop)
        except BadRecord as e:
            raise BadRecord(f"{e} [{self.where(i)}]") from None

    def where(self, i: int) -> str:
        return f"{self.csv_path}, line {self.lines[i]}" if self.csv_path else self.path(i)


def read_training_csv(csv_path, image_root, skip_bad: bool = False):
    """The released training.csv (columns image_path,report_content, one row an image), every row checked before a
    run starts (machinery/records.py). Returns (ImageFiles, reports, number of rows skipped)."""
    paths, reports, lines, skipped = training_csv_rows(csv_path, image_root, skip_bad)
    return ImageFiles(paths, image_root, str(csv_path), lines), reports, skipped


if __name__ == "__main__":  # the tools that turn downloads into files the scripts read live in prepare.py
    print(f"data.py: error: data.py is what pre-training reads, not a command; the tools are in prepare.py: "
          f"python prepare.py {' '.join(sys.argv[1:]) or 'synth|resize|mimic|siim-masks'} (--help lists them)",
          file=sys.stderr)
    sys.exit(2)
