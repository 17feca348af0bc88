"""Records for MRM pre-training: radiographs, reports, and what turns them into training samples.

Read top to bottom:
  1. reports: WordPiece tokenizer (load or train), encoding to 100 ids, masking (Sec. 3.1);
  2. augmentation (released main_pretrain.py): random resized crop to 448, bicubic, horizontal flip;
  3. the records of a run (synthetic.py's built-in ones, or `training.csv`) and the Dataset train.py reads;
  4. images: any file PIL reads (8- or 16-bit, L / RGB / RGBA / P / I;16) or DICOM, to 8-bit grayscale;
then the plumbing (PIL's pixels without a copy; bad flags and errors as one line, UTF-8 lines and
progress bars, shared by the scripts).
The tools that prepare real data are in prepare.py (`python prepare.py -h`), the fine-tuning data in
finetune_data.py, the synthetic records themselves in synthetic.py.

A training sample is a uint8 image; float conversion, normalisation and 3 channels happen on the
training device (mrm.MRM.prepare_images), so the loader moves a quarter of the bytes.
"""
import argparse
import csv
import ctypes
import io
import math
import os
import re
import signal
import sys
import threading
from collections import Counter
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import synthetic
from checkpoints import CheckpointError
from mrm import ConfigError


class BadRecord(ValueError):
    """A record that cannot be used: the message names the file (and CSV line) and the problem."""


# -----------------------------------------------------------------------------
# 1. Reports: WordPiece tokens, [CLS] first, 100 ids, masked (Sec. 3.1)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[MASK]")  # ids 0..3, as the released tokenizer


def load_tokenizer(path):
    """A `tokenizers` JSON file (e.g. the released mimic_wordpiece.json) or a BERT vocab.txt."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    try:
        if path.endswith(".txt"):  # BERT style: one token a line, its id the line number
            tok = Tokenizer(WordPiece.from_file(path, unk_token="[UNK]"))
            tok.normalizer = normalizers.BertNormalizer(lowercase=True)
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        else:
            tok = Tokenizer.from_file(path)
    except Exception as e:
        raise ConfigError(f"{path}: not a tokenizer file ({type(e).__name__}: {e})") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ConfigError(f"{path}: the tokenizer lacks the special tokens {missing}")
    return tok


def _released_pipeline(tok):
    """The released tokenizer's text handling: lowercase, NFKD, accents stripped; split on whitespace,
    punctuation and digits; '##' pieces glued back when decoding."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits()])
    tok.decoder = decoders.WordPiece()
    return tok


def train_tokenizer(reports, vocab_size: int = 30000):
    """A WordPiece tokenizer for these reports, deterministically: [PAD] [UNK] [CLS] [MASK] = 0 1 2 3, every
    character seen, alone and as a '##' continuation (so no word becomes [UNK]), then whole words by
    frequency, ties in alphabetical order, up to vocab_size. Words left out are spelled in pieces.

    Why not the `tokenizers` WordPiece trainer: it breaks ties between equal counts in hash order, so two
    trainings on the same reports give different vocabularies (and two runs of one seed, different losses).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    probe = _released_pipeline(Tokenizer(WordPiece({"[UNK]": 0}, unk_token="[UNK]")))
    counts = Counter()
    for report in reports:
        counts.update(w for w, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(report)))
    chars = sorted({c for word in counts for c in word})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]
    return _released_pipeline(Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")))


def encode_reports(tok, reports, max_len: int = 100) -> np.ndarray:
    """(N, max_len) int32: [CLS] + the report's first max_len - 1 word pieces, then [PAD]."""
    cls, pad = tok.token_to_id("[CLS]"), tok.token_to_id("[PAD]")
    out = np.full((len(reports), max_len), pad, dtype=np.int32)
    out[:, 0] = cls
    for n, enc in enumerate(tok.encode_batch(list(reports), add_special_tokens=False)):
        ids = enc.ids[: max_len - 1]
        out[n, 1:1 + len(ids)] = ids
    return out


def mask_report(ids: np.ndarray, ratio: float, rng, mask_id: int, pad_id: int):
    """Sec. 3.1: each real token (not [CLS] at 0, not [PAD]) becomes [MASK] with probability `ratio`,
    at least one per report (no BERT 80/10/10 split). Returns tokens and labels (-100 = not scored)."""
    real = ids != pad_id
    real[0] = False
    if not real.any():
        raise BadRecord("a report with no token to mask")
    chosen = real & (rng.random(len(ids)) < ratio)
    if not chosen.any():
        chosen[rng.choice(np.flatnonzero(real))] = True
    return np.where(chosen, mask_id, ids), np.where(chosen, ids, -100)


# -----------------------------------------------------------------------------
# 2. Augmentation (released main_pretrain.py: RandomResizedCrop(448, scale 0.2-1, bicubic) + horizontal flip)


def random_resized_crop_box(width: int, height: int, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """A crop box (left, top, right, bottom) covering `scale` of the area with aspect in `ratio`;
    ten tries, then the centre crop of the clamped aspect (the usual RandomResizedCrop recipe)."""
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
    """Random resized crop to size x size (bicubic, antialiased when shrinking), then a coin-flip
    mirror. Returns (size, size) uint8. min_crop: the smallest share of the area a crop keeps (released: 0.2).
    Note: mirroring swaps the heart's side while the report still says 'left' (the released recipe;
    train.py --no-hflip keeps laterality)."""
    box = random_resized_crop_box(*img.size, rng, (min_crop, 1.0))
    return resize_box(img, box, size, coin_flip(rng, hflip))


def coin_flip(rng, hflip: bool) -> bool:
    """Mirror this crop? Half the time with hflip; drawn after the crop box, as the released transforms
    run (RandomResizedCrop, then RandomHorizontalFlip; main_pretrain.py)."""
    return hflip and rng.random() < 0.5


def resize_box(img: Image.Image, box, size: int, flip: bool = False) -> np.ndarray:
    """The box (left, top, right, bottom) of an 'L' image, cut out, resized to size x size and, with
    flip, mirrored, as torchvision's RandomResizedCrop and RandomHorizontalFlip do to a PIL image:
    bicubic with PIL's kernel (a = -0.5), antialiased when shrinking, edge pixels repeated past the
    box; within 2 gray levels of PIL's crop().resize() (tested).

    It is torch's uint8 kernel (F.interpolate), pixel for pixel (tested), in its two passes, first along
    the rows, then along the columns, with the rounding to uint8 between them. Its fast path works on 4
    channels at once: a gray image goes through it as a 4-channel one, 3 channels of wasted work, copied
    in and out. So here each pass is given 4 gray lines as the 4 channels of one: 4 rows for the first
    pass, 4 neighbouring columns for the second (a view, no copy). The box is read from PIL's own memory
    (`pixels`), not from a copy. A 448 crop of a 1,024-px film on one core: 0.52-0.54 ms, against about
    1.5 ms for the gray crop as one channel (docs/performance.md)."""
    left, top, right, bottom = box
    if not (0 <= left < right <= img.width and 0 <= top < bottom <= img.height):
        raise ValueError(f"crop box {box} is not inside the {img.width} x {img.height} image")
    if size % 4:  # the second pass groups the output's columns in fours
        return _resize_box_plain(img, box, size, flip)
    w, h = right - left, bottom - top
    fours = -(-h // 4)  # rows in groups of 4; a last group past the image is padded, and dropped after pass 1
    crop = pixels(img)[top:top + 4 * fours, left:right]  # a view
    if len(crop) < 4 * fours:
        crop = np.concatenate([crop, np.zeros((4 * fours - len(crop), w), np.uint8)])
    # pass 1, along the rows: rows 4i .. 4i+3 side by side as the 4 channels of row i (channels last;
    # the batch axis added before the permute, or torch does not see channels last and copies twice)
    x = torch.from_numpy(np.stack([crop[j::4] for j in range(4)], axis=-1))[None].permute(0, 3, 1, 2)
    x = F.interpolate(x, (fours, size), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
    if flip:  # a row's mirror: the copy below does it
        x = x[:, ::-1]
    rows = np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(4 * fours, size)[:h]  # the (h, size) image
    # pass 2, along the columns: the (h, size) image as (h, size / 4) pixels of 4 channels
    y = torch.from_numpy(rows).view(1, h, size // 4, 4).permute(0, 3, 1, 2)
    y = F.interpolate(y, (size, size // 4), mode="bicubic", antialias=True)
    return y[0].permute(1, 2, 0).reshape(size, size).numpy()


def _resize_box_plain(img: Image.Image, box, size: int, flip: bool) -> np.ndarray:
    """resize_box for any size: the gray crop through F.interpolate as one channel (4 times the work)."""
    crop = torch.from_numpy(np.array(img.crop(box)))[None, None]  # np.array: a writable copy of the box
    out = F.interpolate(crop, (size, size), mode="bicubic", antialias=True)[0, 0].numpy()
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def draft_scale(box, size: int) -> int:
    """The largest JPEG decoding reduction (8, 4, 2 or 1) that leaves the crop box at least size x size
    pixels, so the bicubic resize still only shrinks or keeps: 2 for a 1000 x 900 crop to 448."""
    shorter = min(box[2] - box[0], box[3] - box[1])
    for s in (8, 4, 2):
        if shorter >= s * size:
            return s
    return 1


def load_crop(path, size: int, rng, hflip: bool = True, min_crop: float = 0.2) -> np.ndarray:
    """augment(load_image(path), size, rng, hflip, min_crop), with the same draws from rng, but a JPEG is
    decoded only as finely as its crop needs (decode_crop). Returns (size, size) uint8."""
    path = str(path)
    with named_errors(path):
        img, box = decode_crop(path, size, rng, min_crop)
        return resize_box(img, box, size, coin_flip(rng, hflip))


def decode_crop(path: str, size: int, rng, min_crop: float = 0.2):
    """A training crop's box, drawn from rng as augment draws it, and the image it is cut from: (gray
    'L' image, box in that image's pixels). A JPEG's box is drawn from the header's size, then libjpeg
    decodes the file at 1/s scale (DCT scaling, PIL's `draft`, s = draft_scale) and straight to gray,
    and the box is taken to the reduced image's pixels, to the nearest one (less than one output pixel
    off). Pixels differ from the full decode by about one gray level (tested); other formats are decoded
    whole, and give exactly augment's crop."""
    raw = read_file(path)
    if is_dicom(path, raw):
        img = load_dicom(path, raw)
        return img, random_resized_crop_box(*img.size, rng, (min_crop, 1.0))
    with Image.open(io.BytesIO(raw)) as img:
        if img.format != "JPEG":
            img.load()
            img = to_gray8(img)
            return img, random_resized_crop_box(*img.size, rng, (min_crop, 1.0))
        box = random_resized_crop_box(img.width, img.height, rng, (min_crop, 1.0))
        img, s = decode_reduced(img, draft_scale(box, size))
        return img, tuple(round(v / s) for v in box)


def decode_reduced(img: Image.Image, s: int):
    """An opened JPEG decoded at 1/s scale (libjpeg's DCT scaling, PIL's `draft`) and straight to gray:
    (gray 'L' image, the reduction PIL chose, which divides a box of the full image into one of this).
    Another format is decoded whole: the reduction is 1."""
    width = img.width
    drafted = img.draft("L", (width // s, img.height // s))  # None for a file PIL cannot draft
    img.load()
    return to_gray8(img), (width / drafted[1][2] if drafted else 1)  # PIL's box: (0, 0, W/s, H/s)


# -----------------------------------------------------------------------------
# 3. The records of a run, and the Dataset


class SyntheticImages:
    """Synthetic records 0..n-1, rendered on demand. A set of up to `cache_mb` is rendered once up front
    and kept in memory (DataLoader workers share it), so each epoch only crops."""

    def __init__(self, n: int, size: int, seed: int = 0, cache_mb: int = 512):
        self.n, self.size, self.seed = n, size, seed
        self.cache = None
        if n * size * size <= cache_mb * 2**20:
            self.cache = np.stack([self.render(i) for i in progress(range(n), desc="rendering synthetic records",
                                                                     unit=" records")])

    def __len__(self):
        return self.n

    def render(self, i: int) -> np.ndarray:
        return synthetic.synth_record(i, self.size, self.seed)["image"]

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.cache[i] if self.cache is not None else self.render(i))

    def load_crop(self, i: int, size: int, rng, hflip: bool = True, min_crop: float = 0.2) -> np.ndarray:
        return augment(self.load(i), size, rng, hflip, min_crop)

    def where(self, i: int) -> str:
        return f"synthetic record {i}"


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
    """The released format: a CSV with columns image_path,report_content (one row per image), paths
    relative to image_root. Checks up front what is cheap to check: the columns, empty reports and
    missing image files. Returns (ImageFiles, reports, number of rows skipped)."""
    csv_path = str(csv_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"{csv_path}: no such CSV file")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{image_root}: the image root is not a folder")
    paths, reports, lines, problems = [], [], [], []
    rows = csv_rows(csv_path)
    _, header = next(rows, (None, None))
    if header is None or not {"image_path", "report_content"} <= set(header):
        raise BadRecord(f"{csv_path}: needs the columns image_path,report_content; found {header}")
    col_path, col_report = header.index("image_path"), header.index("report_content")
    for row_start, row in progress(rows, desc=f"checking {os.path.basename(csv_path)}", unit=" rows"):
        if not row:  # a blank line
            continue
        path = row[col_path].strip() if len(row) > col_path else ""
        report = row[col_report].strip() if len(row) > col_report else ""
        if not path:
            problems.append(f"{csv_path}, line {row_start}: empty image_path")
        elif not report:
            problems.append(f"{csv_path}, line {row_start}: empty report for {path}")
        elif not os.path.isfile(os.path.join(image_root, path)):
            problems.append(f"{csv_path}, line {row_start}: image {os.path.join(image_root, path)} does not exist")
        else:
            paths.append(path)
            reports.append(report)
            lines.append(row_start)
    if problems and not skip_bad:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise BadRecord(f"{len(problems)} bad rows (use --skip_bad to skip them):\n  {shown}")
    if not paths:
        raise BadRecord(f"{csv_path}: no usable rows")
    return ImageFiles(paths, image_root, csv_path, lines), reports, len(problems)


class PretrainDataset(torch.utils.data.Dataset):
    """Sample i of an epoch: the augmented image (1, S, S) uint8, the masked report (tokens, labels),
    and the noise (L,) that decides its image mask.

    Every random choice comes from a generator seeded with (seed, epoch, i), so a sample does not
    depend on which process or worker draws it, nor on the batch it lands in: runs resume exactly, and
    1 process x 256 and 4 processes x 64 see the same samples. Call set_epoch before each epoch's loader.
    With skip_bad, an unreadable image is replaced by the next record and counted in 'skipped'.
    """

    def __init__(self, images, tokens: np.ndarray, crop_size: int, num_patches: int, text_mask_ratio: float,
                 mask_id: int, pad_id: int, seed: int = 0, hflip: bool = True, skip_bad: bool = False,
                 min_crop: float = 0.2):
        self.images, self.tokens = images, tokens
        self.crop_size, self.num_patches, self.text_mask_ratio = crop_size, num_patches, text_mask_ratio
        self.mask_id, self.pad_id, self.seed, self.hflip, self.skip_bad = mask_id, pad_id, seed, hflip, skip_bad
        self.min_crop = min_crop
        # in shared memory: DataLoader workers that persist across epochs (train.py) read the new epoch
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int):
        self._epoch.fill_(epoch)

    def __len__(self):
        return len(self.images)

    def load(self, i: int, rng=None):
        """Record i's image, or with skip_bad the next readable one's: (image, its index, records skipped).
        The image is the whole PIL image, or with rng the training view: augmented, (S, S) uint8."""
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


def full_view(img: Image.Image, size: int) -> np.ndarray:
    """The whole image resized to size x size as training resizes a crop, no randomness: for pictures and checks."""
    return resize_box(img, (0, 0, *img.size), size)


# -----------------------------------------------------------------------------
# 4. Images: every format becomes one 8-bit gray channel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"}


def to_gray8(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 'L'. 16-bit, 32-bit and float images are stretched min-max to 0..255 (a
    straight convert('L') would clip them); colour, alpha and palette images drop to luminance."""
    if img.mode == "L":
        return img
    if img.mode.startswith("I") or img.mode == "F":  # I;16, I;16B, I (32-bit), F
        return Image.fromarray(_stretch(np.asarray(img, dtype=np.float64)))
    return img.convert("L")


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.round((a - lo) * (255 / max(hi - lo, 1e-12))).astype(np.uint8)


def is_dicom(path, head: bytes) -> bool:
    """By the name, or by the file's first bytes: DICOM Part 10 is a 128-byte preamble, then 'DICM'."""
    return str(path).lower().endswith(".dcm") or head[128:132] == b"DICM"


def read_file(path) -> bytes:
    """The whole file in one read (radiographs are a few MB at most): the DICOM check and the decoder
    (PIL or pydicom) then work from memory, with no second open of the file."""
    with open(path, "rb") as f:
        return f.read()


def load_dicom(path, raw: bytes) -> Image.Image:
    """A DICOM file's bytes (path only names it in errors) as an 8-bit gray image."""
    try:
        import pydicom  # optional: only RSNA / SIIM style DICOM files need it
    except ImportError:
        raise BadRecord(f"{path}: reading DICOM needs the optional package pydicom (pip install pydicom)") from None
    ds = pydicom.dcmread(io.BytesIO(raw))
    a = np.asarray(ds.pixel_array, dtype=np.float64)
    if a.ndim != 2:
        raise BadRecord(f"{path}: expected one gray frame, got pixel data of shape {a.shape}")
    a = a * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    gray = _stretch(a)
    if getattr(ds, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":  # 0 = white: invert
        gray = 255 - gray
    return Image.fromarray(gray)


@contextmanager
def named_errors(path):
    """Any failure while reading `path` becomes a BadRecord that names the file."""
    try:
        yield
    except BadRecord:
        raise
    except FileNotFoundError:
        raise BadRecord(f"{path}: no such image file") from None
    except Image.UnidentifiedImageError:
        raise BadRecord(f"{path}: cannot read image (not a format PIL knows, or not an image)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadRecord(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_image(path) -> Image.Image:
    """Read one radiograph as an 8-bit gray PIL image, or raise BadRecord naming the file."""
    path = str(path)
    with named_errors(path):
        raw = read_file(path)
        if is_dicom(path, raw):
            return load_dicom(path, raw)
        with Image.open(io.BytesIO(raw)) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return to_gray8(img)


# -----------------------------------------------------------------------------
# Plumbing: PIL's pixels without a copy; flags and errors as one line, UTF-8 lines, progress bars


class _ArrowArray(ctypes.Structure):
    """The struct behind an Arrow array capsule (the Arrow C data interface, a stable ABI). Its schema
    capsule's struct starts with the format string: b"C" for uint8."""
    _fields_ = [("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
                ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
                ("buffers", ctypes.POINTER(ctypes.c_void_p)), ("children", ctypes.c_void_p),
                ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]


# CPython's PyCapsule_GetPointer(capsule, name), typed here (ctypes.pythonapi's own entry left as it is)
_capsule_pointer = (ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)) if hasattr(ctypes, "pythonapi") else None)


def pixels(img: Image.Image) -> np.ndarray:
    """An 'L' image's pixels as a read-only (height, width) uint8 array that reads PIL's own memory.

    np.asarray(img) copies the image twice (PIL's tobytes encodes it in pieces, then joins them); after
    a JPEG decode has filled the caches, cropping and copying cost about 0.35 ms a 448 crop. Pillow
    11.2 and later export an image without a copy through the Arrow C data interface: a capsule holding
    a pointer to the pixels, which numpy reads here; the array keeps the capsule, and with it PIL's
    memory, alive. The copy instead: for an image whose memory is not PIL's own (Image.fromarray's, which
    Pillow 11.2-12.x crash on exporting), one PIL keeps in pieces (over 16 MB), a Pillow without the
    export, or a Python other than CPython."""
    if (img.mode != "L" or img.readonly or not img.width * img.height or _capsule_pointer is None
            or not hasattr(img, "__arrow_c_array__")):
        return np.asarray(img)
    try:
        schema, capsule = img.__arrow_c_array__()
    except ValueError:  # "Image rows are not contiguous in memory": PIL keeps it in pieces
        return np.asarray(img)
    uint8 = ctypes.c_char_p.from_address(_capsule_pointer(schema, b"arrow_schema")).value == b"C"
    array = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
    if not uint8 or array.length != img.width * img.height or array.offset != 0 or array.n_buffers != 2:
        return np.asarray(img)  # not the layout this reads: one buffer of uint8 ('C') after the validity one
    memory = (ctypes.c_uint8 * array.length).from_address(array.buffers[1])
    memory.keep = capsule  # the capsule, and PIL's memory with it, lives while an array reads it
    view = np.frombuffer(memory, np.uint8).reshape(img.height, img.width)
    view.flags.writeable = False
    return view


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, `SCRIPT: error: ...`, exit status 2 (without the usage,
    which for these scripts is a screenful): the same form as every other expected error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def bounded(kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` (int or float), finite, within [low, high] (an open end where asked)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{low}, "
                                             f"{high if high is not None else 'inf'}{')' if high_open else ']'}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def text_lines(path):
    """The lines of a UTF-8 text file (a CSV, a split list), decoded one at a time so that a byte that
    is not UTF-8 is refused with its file, line and column. No other encoding is guessed: a guess that
    is wrong turns a report's words into other words without a sound. Any line end ends a line (Unix
    \\n, Windows \\r\\n, old Mac \\r); each line comes with a \\n."""
    number = 0
    with open(path, "rb") as f:
        for chunk in f:  # split at \n; a file with \r alone comes as one chunk, split below
            for raw in chunk.splitlines():
                number += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadRecord(f"{path}, line {number}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is "
                                    "not UTF-8; re-save the file as UTF-8") from None
                yield (line.removeprefix("\ufeff") if number == 1 else line) + "\n"  # a spreadsheet's byte-order mark


def csv_rows(path):
    """(line where the row starts, row) for each row of a UTF-8 CSV file; a row the csv module cannot
    read (a field over its 131,072-character limit, say) is refused with its file and line."""
    reader = csv.reader(text_lines(path))
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise BadRecord(f"{path}, line {start}: not a readable CSV row ({e})") from None


@contextmanager
def one_line_errors(script: str, *expected: type, interrupted=None):
    """Run a script's main: an expected error (a bad record or setting, a refused checkpoint, a missing
    file, or one of `expected`) is printed as `SCRIPT: error: MESSAGE` on stderr, exit status 2, as
    argparse does for a bad flag, also when a DataLoader worker raised it; anything else is a bug and
    keeps its traceback. Ctrl-C, and SIGTERM (what a scheduler sends before it kills a job), stop the
    script the same way: whatever was being saved is dropped (checkpoints.save_checkpoint), and one line
    says so, then `interrupted()`, e.g. how to resume; exit status 130 (Ctrl-C) or 143 (SIGTERM)."""
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        yield
    except (BadRecord, ConfigError, CheckpointError, FileNotFoundError, *expected) as e:
        print(f"{script}: error: {original_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets the signal: one line
            how = f"; {interrupted()}" if interrupted else ""
            print(f"{script}: {'stopped by SIGTERM' if terminated else 'interrupted'}{how}", file=sys.stderr)
        sys.exit(143 if terminated else 130)
    finally:
        if main_thread and previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def original_message(e: BaseException) -> str:
    """An error raised in a DataLoader worker reaches the main process as the same type with the message
    'Caught X in DataLoader worker process N. Original Traceback (...)': its last line holds the original."""
    text = str(e)
    if "in DataLoader worker process" not in text:
        return text
    found = list(re.finditer(rf"^[\w.]*{type(e).__name__}: (.*?)\s*(?=^\S|\Z)", text, flags=re.M | re.S))
    return found[-1].group(1) if found else text


def progress(iterable, **kw):
    """A tqdm bar at a terminal, only in the first process under torchrun."""
    return tqdm(iterable, leave=False, disable=None if os.environ.get("RANK", "0") == "0" else True, **kw)



if __name__ == "__main__":  # the tools that turn downloads into files the scripts read live in prepare.py
    print(f"data.py: error: data.py is what pre-training reads, not a command; the tools are in prepare.py: "
          f"python prepare.py {' '.join(sys.argv[1:]) or 'synth|resize|mimic|siim-masks'} (--help lists them)",
          file=sys.stderr)
    sys.exit(2)
