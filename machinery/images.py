"""Radiograph files to 8-bit gray (load_image: any PIL format or DICOM, else a BadRecord naming the file), and a
training crop's fast path for data.py's recipe: decode_crop, resize_box, pixels (docs/performance.md)."""
import ctypes
import io
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from machinery.errors import BadRecord

# -----------------------------------------------------------------------------
# Every format becomes one 8-bit gray channel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"}


def to_gray8(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 'L': 16-bit, 32-bit, float stretched min-max (convert('L') would clip), colour to luminance."""
    if img.mode == "L":
        return img
    if img.mode.startswith("I") or img.mode == "F":  # I;16, I;16B, I (32-bit), F
        return Image.fromarray(_stretch(np.asarray(img, dtype=np.float64)))
    return img.convert("L")


def _stretch(a: np.ndarray) -> np.ndarray:
    """Min-max to 0..255; a NaN or infinity (a black or flat film) is refused (named_errors names the file)."""
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"{bad} pixels are not finite (NaN or infinite)")
    lo, hi = float(a.min()), float(a.max())
    return np.round((a - lo) * (255 / max(hi - lo, 1e-12))).astype(np.uint8)


def read_file(path) -> tuple[bytes, bool]:
    """(the file's bytes, is it DICOM: by its name, or by 'DICM' after DICOM Part 10's 128-byte preamble)."""
    with open(path, "rb") as f:
        raw = f.read()
    return raw, str(path).lower().endswith(".dcm") or raw[128:132] == b"DICM"


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
        raw, dicom = read_file(path)
        if dicom:
            return load_dicom(path, raw)
        with Image.open(io.BytesIO(raw)) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return to_gray8(img)


# -----------------------------------------------------------------------------
# The fast crop: decode at the crop's scale, resize 4 gray lines at a time


def decode_crop(path: str, size: int, draw_box):
    """(gray 'L' image, box from draw_box(width, height) in its pixels): a JPEG decoded at 1/draft_scale to gray, the
    box rounded (under one output pixel off, about a gray level: tested); other formats whole, the plain crop."""
    with named_errors(path):
        raw, dicom = read_file(path)
        if dicom:
            img = load_dicom(path, raw)
            return img, draw_box(*img.size)
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "JPEG":
                img.load()
                return to_gray8(img), draw_box(img.width, img.height)
            box = draw_box(img.width, img.height)
            img, s = decode_reduced(img, draft_scale(box, size))
            return img, tuple(round(v / s) for v in box)


def decode_reduced(img: Image.Image, s: int):
    """An opened JPEG decoded at 1/s scale (libjpeg's DCT scaling, PIL's `draft`) straight to gray: (gray 'L' image,
    the reduction PIL chose, which divides a full image's box into this one's). Other formats: whole, reduction 1."""
    width = img.width
    drafted = img.draft("L", (width // s, img.height // s))  # None for a file PIL cannot draft
    img.load()
    return to_gray8(img), (width / drafted[1][2] if drafted else 1)  # PIL's box: (0, 0, W/s, H/s)


def draft_scale(box, size: int) -> int:
    """The largest JPEG reduction (8, 4, 2, 1) leaving the box size px a side or more: the resize only shrinks."""
    shorter = min(box[2] - box[0], box[3] - box[1])
    for s in (8, 4, 2):
        if shorter >= s * size:
            return s
    return 1


def resize_box(img: Image.Image, box, size: int, flip: bool = False) -> np.ndarray:
    """The box (left, top, right, bottom) of an 'L' image resized to size x size, mirrored with flip, as torchvision
    does to a PIL image (within 2 gray levels; pixel for pixel torch's uint8 bicubic: tested), 4 gray lines as the 4
    channels of torch's fast path in each of its two passes. Why: docs/performance.md, 'What changed'."""
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
    # pass 1, along the rows: rows 4i..4i+3 as row i's 4 channels ([None] before the permute, or not channels last)
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


# -----------------------------------------------------------------------------
# PIL's pixels without a copy (the Arrow C data interface, read with ctypes)


class _ArrowArray(ctypes.Structure):
    """The struct behind an Arrow array capsule (the Arrow C data interface, a stable ABI)."""
    _fields_ = [("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
                ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
                ("buffers", ctypes.POINTER(ctypes.c_void_p)), ("children", ctypes.c_void_p),
                ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]


# CPython's PyCapsule_GetPointer(capsule, name), typed here (ctypes.pythonapi's own entry left as it is)
_capsule_pointer = (ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)) if hasattr(ctypes, "pythonapi") else None)


def pixels(img: Image.Image) -> np.ndarray:
    """An 'L' image's pixels, a read-only uint8 view of PIL's memory (Pillow 11.2+'s Arrow export); np.asarray's two
    copies where the memory is numpy's (Pillow 11.2-12.x crash exporting it), in pieces, or not exported."""
    if (img.mode != "L" or img.readonly or not img.width * img.height or _capsule_pointer is None
            or not hasattr(img, "__arrow_c_array__")):
        return np.asarray(img)
    try:
        schema, capsule = img.__arrow_c_array__()
    except ValueError:  # "Image rows are not contiguous in memory": PIL keeps it in pieces
        return np.asarray(img)
    uint8 = ctypes.c_char_p.from_address(_capsule_pointer(schema, b"arrow_schema")).value == b"C"  # format first
    array = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
    if not uint8 or array.length != img.width * img.height or array.offset != 0 or array.n_buffers != 2:
        return np.asarray(img)  # not the layout this reads: one buffer of uint8 ('C') after the validity one
    memory = (ctypes.c_uint8 * array.length).from_address(array.buffers[1])
    memory.keep = capsule  # the capsule, and PIL's memory with it, lives while an array reads it
    view = np.frombuffer(memory, np.uint8).reshape(img.height, img.width)
    view.flags.writeable = False
    return view
