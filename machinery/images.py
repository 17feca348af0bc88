"""Radiograph files to 8-bit gray pixels, and the fast path of a training crop.

  * load_image: any file PIL reads (8- or 16-bit, L / RGB / RGBA / P / I;16 / F) or DICOM (pydicom, optional),
    as one 8-bit gray channel, or a BadRecord that names the file;
  * decode_crop: a JPEG decoded only as finely as its crop needs (libjpeg's DCT scaling);
  * resize_box: the crop resized as torchvision's RandomResizedCrop does, 4 gray lines at a time;
  * pixels: an image's pixels read where PIL decoded them (Pillow's Arrow export, through ctypes).
data.py's crop recipe (which box, whether to mirror) calls these; docs/performance.md has their timings.
"""
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
    """Any PIL mode -> 'L'. 16-bit, 32-bit and float images are stretched min-max to 0..255 (a
    straight convert('L') would clip them); colour, alpha and palette images drop to luminance."""
    if img.mode == "L":
        return img
    if img.mode.startswith("I") or img.mode == "F":  # I;16, I;16B, I (32-bit), F
        return Image.fromarray(_stretch(np.asarray(img, dtype=np.float64)))
    return img.convert("L")


def _stretch(a: np.ndarray) -> np.ndarray:
    """Min-max to 0..255. A pixel that is not finite would turn the whole film black (a NaN) or flat (an
    infinity): refused, and named_errors names the file."""
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"{bad} pixels are not finite (NaN or infinite)")
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
# The fast crop: decode at the crop's scale, resize 4 gray lines at a time


def decode_crop(path: str, size: int, draw_box):
    """A training crop's box and the image it is cut from: (gray 'L' image, box in that image's pixels).
    draw_box(width, height) -> (left, top, right, bottom) draws the box for the full image (data.py's
    recipe). A JPEG's box is drawn from the header's size, then libjpeg decodes the file at 1/s scale (DCT
    scaling, PIL's `draft`, s = draft_scale) and straight to gray, and the box is taken to the reduced
    image's pixels, to the nearest one (less than one output pixel off). Pixels differ from the full decode
    by about one gray level (tested); other formats are decoded whole, and give exactly the plain crop."""
    with named_errors(path):
        raw = read_file(path)
        if is_dicom(path, raw):
            img = load_dicom(path, raw)
            return img, draw_box(*img.size)
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "JPEG":
                img.load()
                img = to_gray8(img)
                return img, draw_box(*img.size)
            box = draw_box(img.width, img.height)
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


def draft_scale(box, size: int) -> int:
    """The largest JPEG decoding reduction (8, 4, 2 or 1) that leaves the crop box at least size x size
    pixels, so the bicubic resize still only shrinks or keeps: 2 for a 1000 x 900 crop to 448."""
    shorter = min(box[2] - box[0], box[3] - box[1])
    for s in (8, 4, 2):
        if shorter >= s * size:
            return s
    return 1


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


# -----------------------------------------------------------------------------
# PIL's pixels without a copy (the Arrow C data interface, read with ctypes)


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
