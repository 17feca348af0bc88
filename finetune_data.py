"""The data of fine-tuning: build_splits(cfg, size) gives finetune.py {'train', 'val', 'test'} FinetuneDatasets and
the label names. Read top to bottom:
  1. the released training and test views (crop, flip, resize), a step-seeded sampler that makes a run resumable
     exactly, and the Dataset finetune.py reads;
  2. the splits, from split lists or from synthetic records (machinery/synthetic.py) rendered into memory, with an
     optional seeded label fraction;
  3. the split-list files: the released DatasetsSplits/ format ('relative/path l1 ... lK') of NIH ChestX-ray14,
     CheXpert, RSNA and COVID, and SIIM's image-id lists with their masks (prepare.py makes them: prepare.py -h).
"""
import math
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

import data
from data import random_resized_crop_box
from machinery.errors import BadRecord, ConfigError
from machinery.images import IMAGE_SUFFIXES, load_image
from machinery.records import text_lines
from machinery.synthetic import FINDINGS, SyntheticFilms


# Label columns of the released split lists (DatasetsSplits/), so tables print names, not indices.
LABEL_NAMES = {
    "nih": ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"),
    "chexpert": ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"),
    "rsna": ("Pneumonia",),
    "covid": ("COVID-19",),          # COVID-19 vs other pneumonia
    "viral": ("Viral pneumonia",),   # viral vs bacterial pneumonia
    "siim": ("Pneumothorax",),
    "synthetic": FINDINGS,
}


# -----------------------------------------------------------------------------
# 1. The released training and test views, and the dataset finetune.py reads


def train_view(img: Image.Image, size: int, rng, scale=(0.08, 1.0), mask: Image.Image | None = None,
               hflip: bool = True):
    """RandomResizedCrop(size) + horizontal flip, bilinear, as the released fine-tuning's transforms
    (NIH_ChestX-ray/utils/data_utils.py, torchvision's default), the mask (if any) cropped alike, nearest-neighbour.
    Returns uint8 (size, size) arrays: image, and mask or None."""
    box = random_resized_crop_box(*img.size, rng, scale=scale)
    flip = rng.random() < 0.5 and hflip  # drawn either way: the same crops with and without flips

    def view(picture, resample):
        picture = picture.resize((size, size), resample, box=box)
        return np.asarray(picture.transpose(Image.FLIP_LEFT_RIGHT) if flip else picture)
    return view(img, Image.BILINEAR), None if mask is None else view(mask, Image.NEAREST)


def eval_view(img: Image.Image, size: int, mask: Image.Image | None = None, center_crop: bool = True):
    """Resize(size) + CenterCrop(size) in one resampling, bilinear as the released test transform: the centred
    square of the shorter side, resized (segmentation, center_crop=False: the whole image, so every pixel is scored)."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s) if center_crop else (0, 0, w, h)
    image = np.asarray(img.resize((size, size), Image.BILINEAR, box=box))  # torchvision Resize's default, as released
    return image, None if mask is None else np.asarray(mask.resize((size, size), Image.NEAREST, box=box))


class StepSampler(Sampler):
    """Training positions from start_step * batch to steps * batch. Position p is record perm_e[p % n] of epoch
    e = p // n, and p also seeds that sample's crop: the run is a function of the seed alone, and a run resumed at a
    step draws exactly what the stopped one would have."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, start_step: int = 0):
        self.n, self.batch_size, self.steps, self.seed, self.start_step = n, batch_size, steps, seed, start_step

    def __len__(self):
        return (self.steps - self.start_step) * self.batch_size

    def __iter__(self):
        epoch, perm = -1, None
        for p in range(self.start_step * self.batch_size, self.steps * self.batch_size):
            if p // self.n != epoch:
                epoch = p // self.n
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            yield int(perm[p % self.n]), p


class FinetuneDataset(Dataset):
    """Records of one split: index i gives the test view, (i, p) from StepSampler a training view drawn with
    generator (seed, p). Items: image (1, S, S) uint8 and target: labels (K,) float or mask (S, S)."""

    def __init__(self, images, size: int, labels: np.ndarray | None = None, masks=None, seed: int = 0,
                 min_crop: float = 0.08, hflip: bool = True):
        self.images, self.size, self.labels, self.masks, self.seed = images, size, labels, masks, seed
        self.min_crop, self.hflip = min_crop, hflip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key) -> dict:
        i, position = key if isinstance(key, tuple) else (key, None)
        img = self.images.load(i)
        mask = self.masks.load_mask(i) if self.masks is not None else None
        if mask is not None and mask.size != img.size:  # SIIM masks are 1024 px; the image may be shrunk
            mask = mask.resize(img.size, Image.NEAREST)
        if position is None:
            image, mask = eval_view(img, self.size, mask, center_crop=mask is None)
        else:
            rng = np.random.default_rng([self.seed, position])
            if mask is None:
                image, _ = train_view(img, self.size, rng, (self.min_crop, 1.0), hflip=self.hflip)
            else:  # the released SIIM pipeline: the whole film resized (keeping its square ratio) and a flip, no crop
                image, mask = eval_view(img, self.size, mask, center_crop=False)
                if rng.random() < 0.5 and self.hflip:
                    image, mask = image[:, ::-1], mask[:, ::-1]
        target = torch.from_numpy(self.labels[i]) if mask is None else torch.from_numpy(mask > 0)
        return {"image": torch.from_numpy(image.copy())[None], "target": target}


def to_input(images: torch.Tensor, device, sizes) -> torch.Tensor:
    """(B, 1, S, S) uint8 -> (B, 3, S, S) normalised floats on the device (sizes: the encoder's mrm.MRMConfig): the
    loader ships bytes, a quarter of the floats."""
    x = images.to(device, non_blocking=True).float().div_(255)
    return ((x - sizes.pixel_mean) / sizes.pixel_std).expand(-1, sizes.in_chans, -1, -1)


# -----------------------------------------------------------------------------
# 2. Splits: from split lists, or synthetic records (finetune.py --dataset synthetic)

SYNTH_START = 1_000_000  # synthetic fine-tuning records start here: pre-training never saw them
SPLIT_FILES = {1: "train_1.txt", 10: "train_10.txt", 100: "train_list.txt"}


def build_splits(cfg, size: int, rendered: dict | None = None) -> tuple[dict, tuple]:
    """{'train', 'val', 'test'} FinetuneDatasets and the label names of a finetune.FinetuneConfig. `rendered` keeps
    the synthetic films across calls (experiments/miniature.py renders them once for all its runs)."""
    cfg = resolve_lists(cfg)
    segment = cfg.task == "segment"
    rendered = {} if rendered is None else rendered
    if cfg.dataset == "synthetic" and not cfg.train_list:
        findings = [f.strip() for f in cfg.seg_findings.split(",")] if segment else []
        unknown = [f for f in findings if f not in FINDINGS]
        if unknown:
            raise ConfigError(f"--seg_findings: unknown {unknown}; choose from {FINDINGS}")
        render = min(2 * size, 512)  # as pre-training saw them: crops of a larger film
        counts = {"train": cfg.num_records, "val": cfg.num_val, "test": cfg.num_test}
        splits, first = {}, SYNTH_START
        for name, n in counts.items():
            key = (first, n, render, tuple(findings))
            if key not in rendered:
                rendered[key] = SyntheticFilms(first, n, render, findings)
            films = rendered[key]
            splits[name] = (films, films.labels, films if segment else None)
            first += n
        names = ("+".join(findings),) if segment else FINDINGS
    else:
        lists = {"train": cfg.train_list, "val": cfg.val_list, "test": cfg.test_list}
        empty = [k for k, v in lists.items() if not v]
        if empty:
            raise ConfigError(f"give --{empty[0]}_list (or --splits DIR) for --dataset {cfg.dataset}")
        if segment:
            splits = {}
            for name, path in lists.items():
                root = cfg.image_root or os.path.dirname(os.path.abspath(path))
                images, masks = read_id_list(path, root, cfg.mask_root)
                splits[name] = (images, None, masks)
            names = LABEL_NAMES.get(cfg.dataset, ("l1",))
        else:
            splits = {name: (images, labels, None) for name, (images, labels) in read_labelled_lists(cfg).items()}
            names = LABEL_NAMES.get(cfg.dataset, tuple(f"l{j + 1}" for j in range(splits["train"][1].shape[1])))
    if cfg.label_fraction < 1:
        images, labels, masks = splits["train"]
        keep = label_subset(len(images), cfg.label_fraction, cfg.seed)
        splits["train"] = (Subset(images, keep), None if labels is None else labels[keep],
                           None if masks is None else Subset(masks, keep))
    return {name: FinetuneDataset(img, size, None if segment else lab, msk, cfg.seed, cfg.min_crop, cfg.hflip)
            for name, (img, lab, msk) in splits.items()}, names


def resolve_lists(cfg):  # cfg: a finetune.FinetuneConfig
    """--splits DIR fills the lists left empty: the train list of --ratio, val_list, test_list."""
    if cfg.task not in ("classify", "segment"):
        raise ConfigError(f"--task must be classify or segment, got {cfg.task!r}")
    if cfg.splits:
        if cfg.ratio not in SPLIT_FILES:
            raise ConfigError(f"--ratio must be one of {sorted(SPLIT_FILES)} with --splits, got {cfg.ratio}")
        for field, name in (("train_list", SPLIT_FILES[cfg.ratio]), ("val_list", "val_list.txt"),
                            ("test_list", "test_list.txt")):
            if not getattr(cfg, field):
                setattr(cfg, field, os.path.join(cfg.splits, name))
    if cfg.task == "segment" and cfg.train_list and not cfg.mask_root:
        raise ConfigError("segmentation from split lists needs --mask_root (python prepare.py siim-masks)")
    return cfg


def count_splits(cfg) -> tuple[dict, list]:
    """--dry_run's look at the splits, no image looked for: the records of each (None for a list not given: the
    schedule still resolves; the train split after --label_fraction) and the label names. A classification list is
    read and checked as a run reads it, a segmentation list's ids only counted."""
    segment = cfg.task == "segment"
    columns = 0
    if cfg.dataset == "synthetic" and not cfg.train_list:
        counts = {"train": cfg.num_records, "val": cfg.num_val, "test": cfg.num_test}
    elif segment:
        lists = {"train": cfg.train_list, "val": cfg.val_list, "test": cfg.test_list}
        counts = {name: len(read_ids(path)) if path else None for name, path in lists.items()}
    else:
        read = read_labelled_lists(cfg, images=False)
        counts = {name: None if got is None else len(got[1]) for name, got in read.items()}
        labels = [got[1] for got in read.values() if got is not None]
        columns = labels[0].shape[1] if labels else 0
    if cfg.label_fraction < 1 and counts["train"]:
        counts["train"] = len(label_subset(counts["train"], cfg.label_fraction, cfg.seed))
    if segment:
        names = ["+".join(f.strip() for f in cfg.seg_findings.split(","))] if cfg.dataset == "synthetic" \
            else list(LABEL_NAMES.get(cfg.dataset, ["finding"]))
    else:
        names = list(LABEL_NAMES.get(cfg.dataset, [f"l{j + 1}" for j in range(columns)]))
    return counts, names


def label_count_hint(dataset: str, expected: int, found: int, path: str) -> str:
    """The refusal of a list whose label count is not its --dataset's, saying which --dataset fits."""
    fits = [d for d, names in LABEL_NAMES.items() if len(names) == found and d not in ("synthetic", "siim")]
    default = " (the default)" if dataset == "synthetic" else ""
    return (f"{path}: {found} label(s) a line, not the {expected} of --dataset {dataset}{default}: pass "
            + (f"--dataset {' or '.join(fits)} (its label names and released schedule), or " if fits else "")
            + "--dataset custom with --steps (or --epochs) and --lr")


def label_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random fraction of n records (at least one)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"label_fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * n))
    return np.sort(np.random.default_rng([seed, 101]).choice(n, size=k, replace=False))


class Subset:
    """Records `ids` of an image source (ImageFiles, SyntheticFilms, ...), re-indexed 0..len-1."""

    def __init__(self, source, ids):
        self.source, self.ids = source, np.asarray(ids)

    def __len__(self):
        return len(self.ids)

    def load(self, i):
        return self.source.load(int(self.ids[i]))

    def load_mask(self, i):
        return self.source.load_mask(int(self.ids[i]))

    def where(self, i):
        return self.source.where(int(self.ids[i]))


# -----------------------------------------------------------------------------
# 3. Split-list files and masks


def read_labelled_lists(cfg, images: bool = True) -> dict:
    """A finetune.FinetuneConfig's classification lists, read and checked as a run reads them (images=False, for a
    --dry_run: no image looked for): {'train', 'val', 'test'}: (data.ImageFiles, labels (N, K) float32), or None for a
    list not given. Each has --dataset's label count; some validation label has both classes, or no AUC can select."""
    read, k = {}, None
    for name in ("train", "val", "test"):  # train first: val and test must have its label count
        path = getattr(cfg, f"{name}_list")
        if not path:
            read[name] = None
            continue
        files, labels = read_split_list(path, cfg.image_root, k, images)
        named = len(LABEL_NAMES[cfg.dataset]) if cfg.dataset in LABEL_NAMES else labels.shape[1]
        if labels.shape[1] != named:
            raise ConfigError(label_count_hint(cfg.dataset, named, labels.shape[1], path))
        read[name], k = (files, labels), named
    if read["val"] is not None:
        val = read["val"][1] > 0.5
        if not (val.any(0) & ~val.all(0)).any():
            raise BadRecord(f"{cfg.val_list}: every label has one class only, so no validation AUC can select a "
                            "model: give a validation list with positives and negatives")
    return read


def read_split_list(path: str, image_root: str, num_labels: int | None = None, images: bool = True):
    """A released split list, lines 'relative/path l1 ... lK': (data.ImageFiles, labels (N, K) float32). Checks every
    line's labels and, unless not `images` (a --dry_run), that every image exists, naming the list and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such split list")
    root = image_root or os.path.dirname(os.path.abspath(path))
    paths, labels, lines = [], [], []
    for line_no, line in enumerate(text_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError:
            values = [math.nan]
        if not all(math.isfinite(v) for v in values):
            raise BadRecord(f"{path}, line {line_no}: labels must be numbers, got {parts[1:]}")
        if not all(v in (0.0, 1.0) for v in values):  # each label is a finding's presence (binary cross entropy)
            raise BadRecord(f"{path}, line {line_no}: labels must be 0 or 1, got {parts[1:]}")
        if num_labels is None:
            num_labels = len(values)
        if len(values) != num_labels or num_labels == 0:
            raise BadRecord(f"{path}, line {line_no}: expected {num_labels} labels, got {len(values)}")
        paths.append(parts[0])
        labels.append(values)
        lines.append(line_no)
    if not paths:
        raise BadRecord(f"{path}: the split list is empty")
    missing = [(n, p) for n, p in zip(lines, paths) if images and not os.path.exists(os.path.join(root, p))]
    if missing:
        shown = "; ".join(f"line {n}: {os.path.join(root, p)}" for n, p in missing[:5])
        raise BadRecord(f"{path}: {len(missing)} of {len(paths)} images missing (is --image_root right?): {shown}")
    return data.ImageFiles(paths, root, csv_path=path, lines=lines), np.array(labels, dtype=np.float32)


class MaskFiles:
    """Segmentation masks <mask_root>/<id>.png, 0 = background, anything else = the finding."""

    def __init__(self, ids, mask_root):
        self.ids, self.root = list(ids), mask_root

    def load_mask(self, i):
        path = os.path.join(self.root, f"{self.ids[i]}.png")
        try:
            return load_image(path)
        except BadRecord as e:
            raise BadRecord(f"{e} (the mask of image {self.ids[i]})") from None


def _stem(p: str) -> str:
    """The image id of a list entry: its file name less an image suffix. SIIM ids hold dots
    (1.2.276.0.7230010.3.1.4.8323329.2181.1517875171.516361): only a known suffix is dropped."""
    name = os.path.basename(p)
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name


def read_ids(path: str) -> list:
    """The ids of a SIIM split list: one image id a line, or a path whose stem is the id."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such split list")
    return [_stem(line.split()[0]) for line in text_lines(path) if line.strip()]


def read_id_list(path: str, image_root: str, mask_root: str):
    """A SIIM split list (read_ids), each id's image found under image_root (any depth: Kaggle nests its DICOMs)
    and its mask. Returns (images, masks)."""
    ids = read_ids(path)
    found = {}
    for folder, _, files in os.walk(image_root):
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(stem, os.path.relpath(os.path.join(folder, name), image_root))
    missing = [i for i in ids if i not in found]
    if missing:
        raise BadRecord(f"{path}: {len(missing)} of {len(ids)} image ids have no image under {image_root}: "
                        + ", ".join(missing[:5]))
    no_mask = [i for i in ids if not os.path.exists(os.path.join(mask_root, f"{i}.png"))]
    if no_mask:
        raise BadRecord(f"{path}: {len(no_mask)} of {len(ids)} image ids have no {mask_root}/<id>.png mask "
                        "(python prepare.py siim-masks writes them): " + ", ".join(no_mask[:5]))
    return data.ImageFiles([found[i] for i in ids], image_root), MaskFiles(ids, mask_root)
