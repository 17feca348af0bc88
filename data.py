"""Records for MRM pre-training: radiographs, reports, and what turns them into training samples.

Read top to bottom:
  1. images: any file PIL reads (8- or 16-bit, L / RGB / RGBA / P / I;16) or DICOM, to 8-bit grayscale;
  2. synthetic records, the default data: chest-radiograph-like images with findings drawn in, and
     reports that name them (side, zone, size are only in the image), labels and per-pixel masks;
  3. reports: WordPiece tokenizer (load or train), encoding to 100 ids, masking (Sec. 3.1);
  4. augmentation (released main_pretrain.py): random resized crop to 448, bicubic, horizontal flip;
  5. the records of a run (synthetic or `training.csv`) and the Dataset that train.py reads;
  6. command line: `python data.py synth | resize | mimic | siim-masks ...` (see `python data.py -h`).

A training sample is a uint8 image; float conversion, normalisation and 3 channels happen on the
training device (mrm.MRM.prepare_images), so the loader moves a quarter of the bytes.
"""
import argparse
import csv
import gzip
import io
import math
import os
import re
import sys
from collections import Counter
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm import tqdm

from mrm import CheckpointError, ConfigError


class BadRecord(ValueError):
    """A record that cannot be used: the message names the file (and CSV line) and the problem."""


def text_lines(path):
    """The lines of a UTF-8 text file (a CSV, a split list), decoded one at a time so that a byte that
    is not UTF-8 is refused with its file, line and column. No other encoding is guessed: a guess that
    is wrong turns a report's words into other words without a sound."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRecord(f"{path}, line {number}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not "
                                "UTF-8; re-save the file as UTF-8") from None
            yield line.removeprefix("\ufeff") if number == 1 else line  # a spreadsheet's byte-order mark


@contextmanager
def one_line_errors(script: str, *expected: type):
    """Run a script's main: an expected error (a bad record or setting, a refused checkpoint, a missing
    file, or one of `expected`) is printed as `SCRIPT: error: MESSAGE` on stderr, exit status 2, as
    argparse does for a bad flag; anything else is a bug and keeps its traceback."""
    try:
        yield
    except (BadRecord, ConfigError, CheckpointError, FileNotFoundError, *expected) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(2)


def progress(iterable, **kw):
    """A tqdm bar at a terminal, only in the first process under torchrun."""
    return tqdm(iterable, leave=False, disable=None if os.environ.get("RANK", "0") == "0" else True, **kw)


# -----------------------------------------------------------------------------
# 1. Images: every format becomes one 8-bit gray channel

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
# 2. Synthetic records
#
# A record is drawn from its index alone (numpy generators seeded with [seed, i, stream]), so record i
# is the same in every process, every run, and at any count. Three independent streams: the case
# (anatomy and findings), the report's phrasing, and the image noise. Phrasing never looks at the
# findings' side, zone or size, so the words that name them can only be recovered from the image.
# Image layout is a PA view: the patient's right is on the image's left.

FINDINGS = ("atelectasis", "cardiomegaly", "consolidation", "pleural effusion", "pneumothorax", "nodule")
FINDING_PROB = 0.25
SIZES = {"atelectasis": ("mild", "moderate"), "cardiomegaly": ("mild", "moderate"),
         "consolidation": ("small", "large"), "pleural effusion": ("small", "moderate", "large"),
         "pneumothorax": ("small", "large")}
MM_PER_IMAGE_WIDTH = 430.0  # a 43 cm detector: nodule sizes in mm become fractions of the image


def synth_case(i: int, seed: int = 0) -> dict:
    """Anatomy and findings of synthetic record i: {'anatomy': {...}, 'findings': {name: {...}}}."""
    rng = np.random.default_rng([seed, i, 0])
    s = rng.uniform(0.93, 1.05)  # body size
    anatomy = dict(cx=0.5 + rng.normal(0, 0.01), top=0.14 + rng.normal(0, 0.01), s=s,
                   base=0.74 + rng.normal(0, 0.015), ctr=rng.uniform(0.40, 0.48),
                   gamma=rng.uniform(0.8, 1.25), tissue=rng.uniform(0.35, 0.45))
    findings = {}
    for name in FINDINGS:
        if rng.random() >= FINDING_PROB:
            continue
        f = {"side": str(rng.choice(["right", "left"]))}
        if name in SIZES:
            f["size"] = str(rng.choice(SIZES[name]))
        if name in ("consolidation", "nodule"):
            f["zone"] = str(rng.choice(["upper", "middle", "lower"]))
        if name == "atelectasis":
            f["zone"] = str(rng.choice(["middle", "lower"]))
        if name == "nodule":
            f["mm"] = int(rng.integers(5, 15)) * 2  # 10..28 mm
        if name == "cardiomegaly":
            del f["side"]
            anatomy["ctr"] = rng.uniform(0.55, 0.60) if f["size"] == "mild" else rng.uniform(0.61, 0.67)
        f["where"] = rng.uniform(-1, 1, size=3).tolist()  # position jitter inside its zone
        findings[name] = f
    return {"anatomy": anatomy, "findings": findings}


def _lung(X, Y, cx, hw, top, base, dome=0.05):
    """Boolean lung field: rounded apex at `top`, diaphragm dome over `base` (its lowest, lateral point)."""
    t = np.clip((Y - top) / 0.22, 0, 1)
    rel = (X - cx) / hw
    bottom = base - dome * np.clip(1 - rel**2, 0, 1)
    return (np.abs(rel) < np.sqrt(t) * (1 + 0.08 * t)) & (Y > top) & (Y < bottom)


def _ellipse(X, Y, cx, cy, rx, ry, angle=0.0):
    c, s = math.cos(angle), math.sin(angle)
    u, v = (X - cx) * c + (Y - cy) * s, -(X - cx) * s + (Y - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 < 1


def _smooth_noise(rng, size, cells):
    """Blobby noise in about [-1, 1]: a cells x cells random grid, upsampled bicubic."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((size, size), Image.BICUBIC))


def render_case(case: dict, size: int, noise_rng) -> tuple[np.ndarray, np.ndarray]:
    """Draw a case: returns the image (size, size) uint8 and the finding masks (K, size, size) bool."""
    a, S = case["anatomy"], size
    X, Y = np.meshgrid((np.arange(S) + 0.5) / S, (np.arange(S) + 0.5) / S)  # image coordinates in [0, 1]
    cx, s, top = a["cx"], a["s"], a["top"]
    hw = 0.135 * s
    sides = {"right": (cx - 0.165 * s, a["base"], -1), "left": (cx + 0.165 * s, a["base"] + 0.02, 1)}
    lungs = {k: _lung(X, Y, x, hw, top, b) for k, (x, b, _) in sides.items()}
    lung = lungs["right"] | lungs["left"]
    masks = np.zeros((len(FINDINGS), S, S), dtype=bool)
    texture = np.ones((S, S), np.float32)   # lung markings, removed where a pneumothorax is
    extra = np.zeros((S, S), np.float32)    # densities added by findings

    def zone_y(side, zone):
        height = sides[side][1] - top
        return top + height * {"upper": 0.2, "middle": 0.5, "lower": 0.78}[zone]

    for name, f in case["findings"].items():
        k, (j0, j1, j2) = FINDINGS.index(name), f["where"]
        if name == "cardiomegaly":
            continue  # drawn with the heart below
        lx, base, lateral = sides[f["side"]]
        inside = lungs[f["side"]]
        if name == "pleural effusion":  # fluid fills the base, meniscus climbing laterally
            h = {"small": 0.14, "moderate": 0.24, "large": 0.36}[f["size"]]
            out = np.clip((X - lx) * lateral / hw, 0, 1)
            m = inside & (Y > base - h - 0.04 * out)
            texture[m] = 0.0  # fluid hides the lung markings behind it
            extra += 0.3 * m
        elif name == "pneumothorax":  # lung edge pulled in from the chest wall; no markings outside it
            c = {"small": 0.3, "large": 0.6}[f["size"]]
            shifted = lx - lateral * c * hw * 0.6
            collapsed = _lung(X, Y, shifted, hw * (1 - c), top + 0.1 * c, base)
            edge = collapsed & ~_lung(X, Y, shifted, hw * (1 - c) - 0.006, top + 0.1 * c + 0.006, base)
            m = inside & ~collapsed
            texture[m] = 0.0
            extra += -0.1 * m + 0.15 * (edge & inside)
        elif name == "consolidation":  # a cloud of overlapping blobs
            r = {"small": 0.06, "large": 0.11}[f["size"]] * s
            y0, x0 = zone_y(f["side"], f["zone"]) + 0.03 * j1, lx + 0.35 * hw * j0
            blob = np.zeros_like(X)
            for t in range(5):
                bx, by = x0 + 0.5 * r * math.cos(2.4 * t + j2), y0 + 0.5 * r * math.sin(2.4 * t + j2)
                blob = np.maximum(blob, np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2 * (0.6 * r) ** 2)))
            m = inside & (blob > 0.5)
            extra += 0.3 * blob * inside
        elif name == "nodule":
            r = f["mm"] / 2 / MM_PER_IMAGE_WIDTH
            y0, x0 = zone_y(f["side"], f["zone"]) + 0.02 * j1, lx + 0.4 * hw * j0
            m = _ellipse(X, Y, x0, y0, r, r) & inside
            extra += 0.45 * m
        elif name == "atelectasis":  # a plate-like band, nearly horizontal
            length = {"mild": 0.3, "moderate": 0.6}[f["size"]] * hw
            y0, x0 = zone_y(f["side"], f["zone"]) + 0.02 * j1, lx + 0.2 * hw * j0
            m = _ellipse(X, Y, x0, y0, length, 0.022 * s, angle=0.25 * j2) & inside
            extra += 0.3 * m
        masks[k] = m

    # heart: its width over the chest's is the cardiothoracic ratio (> 0.5 is cardiomegaly)
    heart_rx = a["ctr"] * 0.6 * s / 2
    heart = _ellipse(X, Y, cx + 0.3 * heart_rx, a["base"] - 0.1, heart_rx, 0.12 * s)
    if "cardiomegaly" in case["findings"]:
        masks[FINDINGS.index("cardiomegaly")] = heart

    img = np.full((S, S), 0.04, np.float32)                                        # air
    img += a["tissue"] * _ellipse(X, Y, cx, 0.6, 0.44 * s, 0.62)                     # body
    img -= 0.25 * lung                                                              # lung fields
    img += 0.05 * lung * texture * _smooth_noise(noise_rng, S, 24)                  # vessels
    img += 0.25 * (np.abs(X - cx) < 0.05 * s) * (Y < a["base"] - 0.05)             # mediastinum
    spine = np.abs(X - cx) < 0.032 * s
    img += spine * (0.12 + 0.04 * np.cos(2 * math.pi * Y / 0.045))                  # vertebrae
    img += 0.25 * heart
    # posterior ribs: ten arcs a side, curving down away from the spine
    out = np.abs(X - cx)
    phase = (Y - top + 0.02 - 1.2 * np.clip(out - 0.04, 0, None) ** 2) / (0.062 * s)
    rib = np.abs(phase - np.round(phase)) * 0.062 < 0.011
    img += 0.07 * (rib & (phase > -0.5) & (phase < 9.5) & (out > 0.03) & (out < 0.165 * s + hw * 1.15))
    img += extra
    img += 0.03 * _smooth_noise(noise_rng, S, 6)                                   # uneven exposure
    img = np.clip(img, 0, 1) ** a["gamma"]
    img += noise_rng.normal(0, 0.012, (S, S)).astype(np.float32)                   # quantum noise
    gray = Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
    gray = gray.filter(ImageFilter.GaussianBlur(S / 512))                           # soft edges
    return np.asarray(gray), masks


# Per finding: sentences when present, its impression line, sentences when absent, and how often a
# report says it is absent. Fields: {size} {Size} {side} {where} {mm}, filled from the case.
REPORT_TEMPLATES = {
    "cardiomegaly": (["The heart is {size}ly enlarged.", "{Size} cardiomegaly.",
                      "The cardiac silhouette is {size}ly enlarged."], "{Size} cardiomegaly.",
                     ["Heart size is normal.", "The cardiac silhouette is within normal limits.", "Normal heart size."],
                     1.0),
    "pleural effusion": (["{Size} {side} pleural effusion.", "There is a {size} {side} pleural effusion.",
                          "A {size} {side}-sided pleural effusion is present."], "{Size} {side} pleural effusion.",
                         ["No pleural effusion.", "There is no pleural effusion.", "No effusion."], 0.7),
    "pneumothorax": (["{Size} {side} pneumothorax.", "There is a {size} {side} pneumothorax.",
                      "A {size} {side} apical pneumothorax is seen."], "{Size} {side} pneumothorax.",
                     ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."], 0.7),
    "consolidation": (["{Size} area of consolidation in the {where}.", "There is a {size} focal consolidation in the "
                       "{where}.", "A {size} opacity in the {where} is consistent with consolidation."],
                      "{Size} {where} consolidation.", ["No focal consolidation.", "There is no focal consolidation."],
                      0.5),
    "nodule": (["A {mm} mm nodule is seen in the {where}.", "There is a {mm} mm {where} nodule.",
                "{mm} mm nodular opacity in the {where}."], "{mm} mm {where} nodule, recommend follow-up CT.", [], 0.0),
    "atelectasis": (["{Size} linear atelectasis at the {where}.",
                     "There is {size} plate-like atelectasis at the {where}."], "{Size} atelectasis at the {where}.", [],
                    0.0),
}


# The impression as radiologists often write it: the finding named, its side, size and zone left to the
# findings above (or to the film). Chosen for half of the impressions' lines, by the phrasing stream only.
PLAIN_IMPRESSIONS = {"cardiomegaly": "Cardiomegaly.", "pleural effusion": "Pleural effusion.",
                     "pneumothorax": "Pneumothorax.", "consolidation": "Consolidation, possibly pneumonia.",
                     "nodule": "Pulmonary nodule, recommend follow-up CT.", "atelectasis": "Atelectasis."}
PLAIN_IMPRESSION_PROB = 0.5


def write_report(case: dict, rng) -> str:
    """A free-text report for a case, in the FINDINGS / IMPRESSION style of real ones. `rng` chooses
    only the phrasing, the order and which absences are mentioned, never from a finding's attributes."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    sentences, impression = [], []
    for name, (present, summary, absent, p_absent) in REPORT_TEMPLATES.items():
        f = case["findings"].get(name)
        if f is None:
            if absent and rng.random() < p_absent:
                sentences.append(pick(absent))
            continue
        size = f.get("size", "")
        if name == "atelectasis":
            where = f"{f['side']} " + {"lower": "base", "middle": "mid lung"}[f["zone"]]
        elif "zone" in f:
            where = f"{f['side']} " + {"upper": "upper", "middle": "mid", "lower": "lower"}[f["zone"]] + " zone"
        else:
            where = ""
        fill = dict(size=size, Size=size.capitalize(), side=f.get("side", ""), where=where, mm=f.get("mm", ""))
        sentences.append(pick(present).format(**fill))
        plain = rng.random() < PLAIN_IMPRESSION_PROB
        impression.append(PLAIN_IMPRESSIONS[name] if plain else summary.format(**fill))
    if rng.random() < 0.5:
        sentences.append(pick(["The mediastinal contours are unremarkable.", "Mediastinal contours are normal."]))
    if rng.random() < 0.3:
        sentences.append("No acute osseous abnormality.")
    findings = " ".join(sentences[j] for j in rng.permutation(len(sentences)))
    if impression:
        impression_text = " ".join(impression[j] for j in rng.permutation(len(impression)))
    else:
        impression_text = pick(["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                                "Normal chest radiograph."])
    return f"FINDINGS: {findings} IMPRESSION: {impression_text}"


def synth_labels(case: dict) -> np.ndarray:
    """Multi-hot labels in FINDINGS order, float32 (K,)."""
    return np.array([name in case["findings"] for name in FINDINGS], dtype=np.float32)


def synth_report(i: int, seed: int = 0) -> str:
    return write_report(synth_case(i, seed), np.random.default_rng([seed, i, 1]))


def synth_record(i: int, size: int = 256, seed: int = 0) -> dict:
    """Synthetic record i: image (size, size) uint8, report str, labels (K,), masks (K, size, size) bool."""
    case = synth_case(i, seed)
    image, masks = render_case(case, size, np.random.default_rng([seed, i, 2]))
    return {"image": image, "report": synth_report(i, seed), "labels": synth_labels(case), "masks": masks}


# -----------------------------------------------------------------------------
# 3. Reports: WordPiece tokens, [CLS] first, 100 ids, masked (Sec. 3.1)

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
# 4. Augmentation (released main_pretrain.py: RandomResizedCrop(448, scale 0.2-1, bicubic) + horizontal flip)


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
    out = resize_box(img, random_resized_crop_box(*img.size, rng, (min_crop, 1.0)), size)
    return mirror(out, rng, hflip)


def resize_box(img: Image.Image, box, size: int) -> np.ndarray:
    """The box (left, top, right, bottom) of an 'L' image, cut out and resized to size x size, as
    torchvision's RandomResizedCrop does to a PIL image: bicubic with PIL's kernel (a = -0.5),
    antialiased when shrinking, edge pixels repeated past the box. torch's uint8 kernel runs it about
    1.3x as fast as PIL's resize on one core, within 2 gray levels of PIL's pixels (tested)."""
    crop = torch.from_numpy(np.array(img.crop(box)))[None, None]  # np.array: a writable copy of the box
    out = torch.nn.functional.interpolate(crop, (size, size), mode="bicubic", antialias=True)
    return out[0, 0].numpy()


def mirror(img: np.ndarray, rng, hflip: bool) -> np.ndarray:
    """The coin-flip mirror, as a numpy view: the copy that makes a tensor of it then does the flip."""
    return img[:, ::-1] if hflip and rng.random() < 0.5 else img


def draft_scale(box, size: int) -> int:
    """The largest JPEG decoding reduction (8, 4, 2 or 1) that leaves the crop box at least size x size
    pixels, so the bicubic resize still only shrinks or keeps: 2 for a 1000 x 900 crop to 448."""
    shorter = min(box[2] - box[0], box[3] - box[1])
    for s in (8, 4, 2):
        if shorter >= s * size:
            return s
    return 1


def load_crop(path, size: int, rng, hflip: bool = True, min_crop: float = 0.2) -> np.ndarray:
    """augment(load_image(path), size, rng, hflip, min_crop), with the same draws from rng, but a JPEG is decoded
    only as finely as its crop needs: the box is drawn from the header's size, then libjpeg decodes the
    file at 1/s scale (DCT scaling, PIL's `draft`, s = draft_scale) and straight to gray, and the crop is
    resized from that. Pixels differ from the full decode by about one gray level (tested); other
    formats give exactly augment(load_image(path)). Returns (size, size) uint8."""
    path = str(path)
    with named_errors(path):
        raw = read_file(path)
        if is_dicom(path, raw):
            return augment(load_dicom(path, raw), size, rng, hflip, min_crop)
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "JPEG":
                img.load()
                return augment(to_gray8(img), size, rng, hflip, min_crop)
            width = img.width
            box = random_resized_crop_box(width, img.height, rng, (min_crop, 1.0))
            s = draft_scale(box, size)
            drafted = img.draft("L", (width // s, img.height // s))  # None for a file PIL cannot draft
            s = width / drafted[1][2] if drafted else 1  # the reduction PIL chose: its box is (0, 0, W/s, H/s)
            img.load()
            # the box in the reduced image's pixels, to the nearest one (less than one output pixel off)
            out = resize_box(to_gray8(img), tuple(round(v / s) for v in box), size)
    return mirror(out, rng, hflip)


# -----------------------------------------------------------------------------
# 5. The records of a run, and the Dataset


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
        return synth_record(i, self.size, self.seed)["image"]

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
    reader = csv.reader(text_lines(csv_path))
    header = next(reader, None)
    if header is None or not {"image_path", "report_content"} <= set(header):
        raise BadRecord(f"{csv_path}: needs the columns image_path,report_content; found {header}")
    col_path, col_report = header.index("image_path"), header.index("report_content")
    start = reader.line_num + 1  # the line where the next row starts
    for row in progress(reader, desc=f"checking {os.path.basename(csv_path)}", unit=" rows"):
        row_start, start = start, reader.line_num + 1
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
        return {"image": torch.from_numpy(np.ascontiguousarray(img))[None],  # a mirrored view is copied
                "tokens": torch.from_numpy(tokens.astype(np.int64)),
                "labels": torch.from_numpy(labels.astype(np.int64)),
                "noise": torch.from_numpy(rng.random(self.num_patches, dtype=np.float32)),
                "skipped": skipped}


def full_view(img: Image.Image, size: int) -> np.ndarray:
    """The whole image resized to size x size as training resizes a crop, no randomness: for pictures and checks."""
    return resize_box(img, (0, 0, *img.size), size)


# -----------------------------------------------------------------------------
# 6. Command line: write synthetic records to disk, pre-shrink a dataset, convert MIMIC-CXR


def _write_atomic_csv(path, header, rows):
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def write_synthetic(out, n: int, size: int = 512, seed: int = 0):
    """Records 0..n-1 as files in the real formats: images/NNNNN.png, masks/NNNNN.png (bit k set where
    finding k is), training.csv (the train split, image_path,report_content), and split lists
    train_list.txt / val_list.txt / test_list.txt (80/10/10) plus train_1.txt and train_10.txt, each line
    `images/NNNNN.png l1 ... lK` in FINDINGS order, like the released fine-tuning lists."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    bits = (1 << np.arange(len(FINDINGS), dtype=np.uint8))[:, None, None]
    lines, csv_rows = [], []
    for i in tqdm(range(n), desc="synthetic records", unit=" records"):
        rec = synth_record(i, size, seed)
        name = f"images/{i:05d}.png"
        Image.fromarray(rec["image"]).save(out / name)
        Image.fromarray((rec["masks"] * bits).sum(0).astype(np.uint8)).save(out / f"masks/{i:05d}.png")
        lines.append(name + " " + " ".join(str(int(v)) for v in rec["labels"]))
        csv_rows.append((name, rec["report"]))
    n_train, n_val = int(0.8 * n), int(0.1 * n)
    splits = {"train_list": lines[:n_train], "val_list": lines[n_train:n_train + n_val],
              "test_list": lines[n_train + n_val:], "train_1": lines[:max(1, n_train // 100)],
              "train_10": lines[:max(1, n_train // 10)]}
    for name, rows in splits.items():
        (out / f"{name}.txt").write_text("".join(r + "\n" for r in rows))
    _write_atomic_csv(out / "training.csv", ("image_path", "report_content"), csv_rows[:n_train])
    (out / "findings.txt").write_text("\n".join(FINDINGS) + "\n")
    print(f"wrote {n} records to {out} ({n_train} in training.csv); labels in the order of findings.txt")


def _resize_one(job):
    src, dst, size = job
    try:
        img = load_image(src)
        scale = size / min(img.size)
        if scale < 1:  # only ever shrink
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        fmt = "JPEG" if dst.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        tmp = dst.with_name(dst.name + ".tmp")
        img.save(tmp, format=fmt, quality=95)
        os.replace(tmp, dst)  # never leaves a half-written file that a rerun would take as done
        return None
    except Exception as e:
        return f"{src}: {e}"


def resize_dataset(src, dst, size: int = 512, workers: int | None = None):
    """Copy every image under src to the same relative path under dst, shorter side shrunk to `size`,
    8-bit gray (DICOM, TIFF and BMP files become PNG). Files already in dst are skipped."""
    src, dst = Path(src), Path(dst)
    jobs = []
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        target = dst / p.relative_to(src)
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            target = target.with_suffix(".png")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((p, target, size))
    print(f"{len(jobs)} images to shrink under {src} (others already done)")
    errors = []
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        for err in tqdm(pool.map(_resize_one, jobs, chunksize=16), total=len(jobs), unit=" images"):
            if err:
                errors.append(err)
    if errors:
        print(f"{len(errors)} images failed:\n  " + "\n  ".join(errors[:20]), file=sys.stderr)
    return errors


SECTION_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]*):", re.M)


def report_sections(text: str) -> dict:
    """{'FINDINGS': '...', 'IMPRESSION': '...', ...} from a MIMIC-CXR report; whitespace collapsed."""
    heads = list(SECTION_HEADER.finditer(text))
    return {h.group(1).strip(): " ".join(text[h.end(): nxt.start() if nxt else len(text)].split())
            for h, nxt in zip(heads, heads[1:] + [None])}


def mimic_report_text(text: str, sections=None) -> str:
    """A report as pre-training reads it: the whole text, whitespace collapsed (sections=None: the paper's
    Fig. 3 and the released reader use whole reports), or only the named sections ('findings',
    'impression', ...), in that order, with their headers; 'findings' also takes a combined 'FINDINGS AND
    IMPRESSION' section. '' when nothing is left."""
    if sections is None:
        return " ".join(text.split())
    names = []
    for name in sections:
        names += [name.upper()] + (["FINDINGS AND IMPRESSION"] if name.upper() == "FINDINGS" else [])
    found = report_sections(text)
    return " ".join(f"{name}: {found[name]}" for name in dict.fromkeys(names) if found.get(name))


def convert_mimic(reports_root, images_root, out_csv, metadata=None, views=None, sections=None):
    """MIMIC-CXR-JPG + the MIMIC-CXR reports -> training.csv (image_path relative to images_root).
    reports_root holds files/pXX/pSUBJECT/sSTUDY.txt; images_root holds files/pXX/pSUBJECT/sSTUDY/*.jpg.
    By default every image and the whole report, as the paper pre-trains (over 370,000 images, every
    view). views (e.g. ('PA', 'AP')) keeps those views only and needs the metadata CSV
    (mimic-cxr-2.0.0-metadata.csv[.gz]), which holds each image's view; sections: see mimic_report_text."""
    reports_root, images_root = Path(reports_root), Path(images_root)
    if views and not metadata:
        raise ConfigError("--views needs --metadata (mimic-cxr-2.0.0-metadata.csv.gz): an image's view is "
                          "in the metadata, not in its file name")
    if metadata:
        opener = gzip.open if str(metadata).endswith(".gz") else open
        with opener(metadata, "rt", newline="") as f:
            images = [Path("files", f"p{r['subject_id'][:2]}", f"p{r['subject_id']}", f"s{r['study_id']}",
                           f"{r['dicom_id']}.jpg")
                      for r in csv.DictReader(f) if not views or r["ViewPosition"] in views]
    else:
        images = sorted(p.relative_to(images_root) for p in images_root.rglob("*.jpg"))
    rows, missing_image, no_report, no_text, cache = [], 0, 0, 0, {}
    for rel in tqdm(images, desc="MIMIC-CXR records", unit=" images"):
        if not (images_root / rel).is_file():
            missing_image += 1
            continue
        study = rel.parent  # files/pXX/pSUBJECT/sSTUDY
        if study not in cache:
            report_file = reports_root / study.parent / f"{study.name}.txt"
            cache[study] = mimic_report_text(report_file.read_text(), sections) if report_file.is_file() else None
        text = cache[study]
        if text is None:
            no_report += 1
        elif not text:
            no_text += 1
        else:
            rows.append((rel.as_posix(), text))
    _write_atomic_csv(out_csv, ("image_path", "report_content"), rows)
    left_out = f"{no_text} whose report has none of the sections {', '.join(sections)}" if sections else \
        f"{no_text} with an empty report"
    print(f"wrote {len(rows)} rows to {out_csv}; skipped {missing_image} missing images, {no_report} "
          f"without a report file, {left_out}")
    return len(rows)


def decode_rle(rle: str, height: int = 1024, width: int = 1024) -> np.ndarray:
    """One SIIM-ACR run-length string -> (height, width) bool mask. Pairs 'offset length': each offset
    counts from the end of the previous run (from pixel 0 for the first), pixels numbered down the
    columns (column-major); '-1' means no pneumothorax."""
    values = [int(v) for v in rle.split()]
    flat = np.zeros(height * width, dtype=bool)
    if values == [-1]:
        return flat.reshape(width, height).T
    if len(values) % 2:
        raise ValueError(f"odd number of values in run-length string {rle[:40]!r}")
    end = 0
    for offset, length in zip(values[0::2], values[1::2]):
        start = end + offset
        if offset < 0 or length <= 0 or start + length > flat.size:
            raise ValueError(f"run {offset} {length} falls outside a {height}x{width} image")
        flat[start:start + length] = True
        end = start + length
    return flat.reshape(width, height).T  # column-major: consecutive pixels run down a column


def write_siim_masks(rle_csv, out, size: int = 1024) -> int:
    """Kaggle's train-rle.csv (header 'ImageId, EncodedPixels', one row per region, '-1' for none) ->
    out/<ImageId>.png, 0 or 255, the regions of an image unioned. Returns the number of images."""
    runs = {}  # image id -> [(CSV line, run-length string)]; decoded one image at a time to bound memory
    rows = csv.reader(text_lines(rle_csv))
    header = [h.strip() for h in next(rows, [])]
    if header[:2] != ["ImageId", "EncodedPixels"]:
        raise BadRecord(f"{rle_csv}: expected the header 'ImageId, EncodedPixels', got {header}")
    for row in rows:
        if not row:
            continue
        if len(row) < 2:
            raise BadRecord(f"{rle_csv}, line {rows.line_num}: expected 'ImageId, EncodedPixels', got {row}")
        runs.setdefault(row[0].strip(), []).append((rows.line_num, row[1].strip()))
    os.makedirs(out, exist_ok=True)
    positive = 0
    for image_id, regions in progress(runs.items(), desc="masks", total=len(runs)):
        mask = np.zeros((size, size), dtype=bool)
        for line, rle in regions:
            try:
                mask |= decode_rle(rle, size, size)
            except ValueError as e:
                raise BadRecord(f"{rle_csv}, line {line}: {e}") from None
        positive += bool(mask.any())
        path = os.path.join(out, f"{image_id}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(f"{path}.tmp.png")
        os.replace(f"{path}.tmp.png", path)  # a stopped run never leaves a half-written mask
    print(f"wrote {len(runs)} masks to {out} ({positive} with pneumothorax)")
    return len(runs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write synthetic records as files + training.csv + split lists")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("resize", help="pre-shrink a folder of images (shorter side), in parallel")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--size", type=int, default=1024,
                   help="shorter side in pixels (default 1024: a 448 crop of area share 0.2 is then rarely upsampled)")
    p.add_argument("--workers", type=int, default=None)
    p = sub.add_parser("mimic", help="MIMIC-CXR-JPG + reports -> training.csv")
    p.add_argument("--reports", required=True, help="folder holding files/pXX/pSUBJECT/sSTUDY.txt")
    p.add_argument("--images", required=True, help="MIMIC-CXR-JPG folder holding files/pXX/...")
    p.add_argument("--metadata", default=None, help="mimic-cxr-2.0.0-metadata.csv[.gz] (each image's view)")
    p.add_argument("--views", default="", help="keep only these views, e.g. PA,AP (default: every view, as the paper)")
    p.add_argument("--sections", default="",
                   help="keep only these report sections, e.g. findings,impression (default: the whole report)")
    p.add_argument("--out", default="training.csv")
    p = sub.add_parser("siim-masks", help="SIIM-ACR train-rle.csv -> one <ImageId>.png mask per image")
    p.add_argument("--rle", required=True, help="Kaggle's train-rle.csv")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=1024, help="image side the run lengths refer to")
    args = parser.parse_args(argv)
    with one_line_errors("data.py"):
        if args.command == "synth":
            write_synthetic(args.out, args.n, args.size, args.seed)
        elif args.command == "resize":
            sys.exit(1 if resize_dataset(args.src, args.dst, args.size, args.workers) else 0)
        elif args.command == "siim-masks":
            write_siim_masks(args.rle, args.out, args.size)
        else:
            convert_mimic(args.reports, args.images, args.out, args.metadata,
                          views=[v.strip().upper() for v in args.views.split(",") if v.strip()] or None,
                          sections=[v.strip() for v in args.sections.split(",") if v.strip()] or None)


if __name__ == "__main__":
    main()
