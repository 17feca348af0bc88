"""Prepare records for train.py and finetune.py: synth, resize, mimic, siim-masks, each with its own --help.
Nothing here is imported by training or fine-tuning: it writes the files data.py and finetune_data.py read."""
import argparse
import csv
import gzip
import os
import re
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from machinery.console import one_line_errors, progress
from machinery.errors import BadRecord, ConfigError
from machinery.files import atomic, write_text
from machinery.images import IMAGE_SUFFIXES, load_image
from machinery.records import csv_rows
from machinery.settings import OneLineParser, bounded
from machinery.synthetic import FINDINGS, synth_record


# -----------------------------------------------------------------------------
# synth: the synthetic records as files, in the formats of the real datasets


def write_synthetic(out, n: int, size: int = 512, seed: int = 0):
    """Records 0..n-1 as files in the real formats (synth's --help); split-list lines `images/NNNNN.png l1 ... lK`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    bits = (1 << np.arange(len(FINDINGS), dtype=np.uint8))[:, None, None]
    lines, reports = [], []
    for i in tqdm(range(n), desc="synthetic records", unit=" records"):
        rec = synth_record(i, size, seed)
        name = f"images/{i:05d}.png"
        Image.fromarray(rec["image"]).save(out / name)
        Image.fromarray((rec["masks"] * bits).sum(0).astype(np.uint8)).save(out / f"masks/{i:05d}.png")
        lines.append(name + " " + " ".join(str(int(v)) for v in rec["labels"]))
        reports.append((name, rec["report"]))
    n_train, n_val = int(0.8 * n), int(0.1 * n)
    splits = {"train_list": lines[:n_train], "val_list": lines[n_train:n_train + n_val],
              "test_list": lines[n_train + n_val:], "train_1": lines[:max(1, n_train // 100)],
              "train_10": lines[:max(1, n_train // 10)]}
    for name, rows in splits.items():
        write_text(str(out / f"{name}.txt"), "".join(r + "\n" for r in rows))
    _write_atomic_csv(out / "training.csv", ("image_path", "report_content"), reports[:n_train])
    write_text(str(out / "findings.txt"), "\n".join(FINDINGS) + "\n")
    print(f"wrote {n} records to {out} ({n_train} in training.csv); labels in the order of findings.txt")


# -----------------------------------------------------------------------------
# resize: a shrunk copy of a folder of films


def _resize_one(job):
    src, dst, size = job
    try:
        img = load_image(src)
        scale = size / min(img.size)
        if scale < 1:  # only ever shrink
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        fmt = "JPEG" if dst.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        with atomic(str(dst)) as tmp:  # never a half-written file that a rerun would take as done
            img.save(tmp, format=fmt, quality=95)
        return None
    except Exception as e:
        return f"{src}: {e}"


def resize_dataset(src, dst, size: int = 512, workers: int | None = None):
    """Every image under src not yet at its path under dst copied there, 8-bit gray, shorter side shrunk to `size`."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    found = [p for p in sorted(src.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise FileNotFoundError(f"{src}: no images under it ({', '.join(sorted(IMAGE_SUFFIXES))})")
    jobs = []
    for p in found:
        target = dst / p.relative_to(src)
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            target = target.with_suffix(".png")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((p, target, size))
    print(f"{len(jobs)} images to shrink under {src} (others already done)")
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        done = tqdm(pool.map(_resize_one, jobs, chunksize=16), total=len(jobs), unit=" images")
        errors = [err for err in done if err]
    if errors:
        print(f"{len(errors)} images failed:\n  " + "\n  ".join(errors[:20]), file=sys.stderr)
    return errors


# -----------------------------------------------------------------------------
# mimic: MIMIC-CXR-JPG and its reports -> training.csv

SECTION_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]*):", re.M)


def report_sections(text: str) -> dict:
    """{'FINDINGS': '...', 'IMPRESSION': '...', ...} from a MIMIC-CXR report; whitespace collapsed."""
    heads = list(SECTION_HEADER.finditer(text))
    return {h.group(1).strip(): " ".join(text[h.end(): nxt.start() if nxt else len(text)].split())
            for h, nxt in zip(heads, heads[1:] + [None])}


def mimic_report_text(text: str, sections=None) -> str:
    """The whole report, whitespace collapsed (sections=None: the paper's Fig. 3, the released reader), or the named
    sections with their headers, in order ('findings' takes 'FINDINGS AND IMPRESSION' too); '' if none."""
    if sections is None:
        return " ".join(text.split())
    names = []
    for name in sections:
        names += [name.upper()] + (["FINDINGS AND IMPRESSION"] if name.upper() == "FINDINGS" else [])
    found = report_sections(text)
    return " ".join(f"{name}: {found[name]}" for name in dict.fromkeys(names) if found.get(name))


def convert_mimic(reports_root, images_root, out_csv, metadata=None, views=None, sections=None):
    """MIMIC-CXR-JPG + its reports -> training.csv (mimic's --help): every image and whole report by default, as the
    paper; views (('PA', 'AP')) needs the metadata CSV, which holds each image's view; sections: mimic_report_text."""
    reports_root, images_root = Path(reports_root), Path(images_root)
    for folder, what in ((reports_root, "reports folder"), (images_root, "images folder")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such {what}")
    if metadata and not Path(metadata).is_file():
        raise FileNotFoundError(f"{metadata}: no such metadata file")
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
    left_out = f"{no_text} whose report has none of the sections {', '.join(sections)}" if sections else \
        f"{no_text} with an empty report"
    skipped = f"skipped {missing_image} missing images, {no_report} without a report file, {left_out}"
    if not rows:  # an empty training.csv would only fail later, in train.py
        raise BadRecord(f"no image with a report, so {out_csv} was not written: of {len(images)} images found, "
                        f"{skipped}")
    _write_atomic_csv(out_csv, ("image_path", "report_content"), rows)
    print(f"wrote {len(rows)} rows to {out_csv}; {skipped}")
    return len(rows)


# -----------------------------------------------------------------------------
# siim-masks: SIIM-ACR run lengths -> PNG masks


def decode_rle(rle: str, height: int = 1024, width: int = 1024) -> np.ndarray:
    """One SIIM-ACR run-length string -> (height, width) bool mask. Pairs 'offset length': each offset counts from
    the end of the previous run (the first from pixel 0), pixels numbered down the columns; '-1': no pneumothorax."""
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
    """Kaggle's train-rle.csv -> out/<ImageId>.png, 0 or 255, an image's regions unioned; returns the image count."""
    if not Path(rle_csv).is_file():
        raise FileNotFoundError(f"{rle_csv}: no such run-length CSV file")
    runs = {}  # image id -> [(CSV line, run-length string)]; decoded one image at a time to bound memory
    rows = csv_rows(rle_csv)
    header = [h.strip() for h in next(rows, (1, []))[1]]
    if header[:2] != ["ImageId", "EncodedPixels"]:
        raise BadRecord(f"{rle_csv}: expected the header 'ImageId, EncodedPixels', got {header}")
    for line_no, row in rows:
        if not row:
            continue
        if len(row) < 2:
            raise BadRecord(f"{rle_csv}, line {line_no}: expected 'ImageId, EncodedPixels', got {row}")
        runs.setdefault(row[0].strip(), []).append((line_no, row[1].strip()))
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
        with atomic(path, ".png") as tmp:  # a stopped run never leaves a half-written mask
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp)
    print(f"wrote {len(runs)} masks to {out} ({positive} with pneumothorax)")
    return len(runs)


# -----------------------------------------------------------------------------
# The command line: one subcommand a tool, each --help saying what it reads and writes, with an example


def main(argv=None):
    parser = OneLineParser(prog="prepare.py", description="Prepare records for train.py and finetune.py. "
                           "`python prepare.py COMMAND -h` says what COMMAND reads and writes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = command(sub, "synth", "write the synthetic records as files, in the formats of the real datasets",
                reads="nothing: each record is drawn from (--seed, its index) by machinery/synthetic.py",
                writes="OUT/images/NNNNN.png; OUT/masks/NNNNN.png (bit k set where finding k is); OUT/training.csv "
                       "(the first 80%: image_path,report_content, for train.py --data); split lists "
                       "OUT/train_list.txt, val_list.txt, test_list.txt (80/10/10), train_1.txt, train_10.txt "
                       "(for finetune.py --splits OUT); OUT/findings.txt (the label order)",
                example="python prepare.py synth --out synth --n 2000")
    p.add_argument("--out", required=True, help="folder to write into (made if missing)")
    p.add_argument("--n", type=bounded(int, 1), default=1000, help="number of records (default 1000)")
    p.add_argument("--size", type=bounded(int, 1), default=512, help="image side in pixels (default 512)")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="the records' seed (default 0)")

    p = command(sub, "resize", "copy a folder of films with the shorter side shrunk, in parallel",
                reads="every image under SRC, at any depth (JPEG, PNG, DICOM, TIFF, BMP)",
                writes="the same relative paths under DST, 8-bit gray, shorter side --size or less (never "
                       "enlarged); DICOM, TIFF and BMP become PNG. Files already in DST are skipped, so a "
                       "stopped run resumes; exit status 1 if an image could not be read (each named)",
                example="python prepare.py resize --src mimic-cxr-jpg --dst mimic-1024")
    p.add_argument("--src", required=True, help="folder of films")
    p.add_argument("--dst", required=True, help="folder of the shrunk copies")
    p.add_argument("--size", type=bounded(int, 1), default=1024,
                   help="shorter side in pixels (default 1024: a 448 crop of area share 0.2 is then rarely upsampled)")
    p.add_argument("--workers", type=bounded(int, 1), default=None, help="processes (default: one a core)")

    p = command(sub, "mimic", "MIMIC-CXR-JPG + the MIMIC-CXR reports -> the training.csv that train.py reads",
                reads="REPORTS/files/pXX/pSUBJECT/sSTUDY.txt and IMAGES/files/pXX/pSUBJECT/sSTUDY/*.jpg; "
                      "with --metadata, mimic-cxr-2.0.0-metadata.csv[.gz] (each image's view)",
                writes="OUT (default training.csv): image_path (relative to IMAGES),report_content; by default "
                       "every image and its whole report, as the paper pre-trains; images without a report "
                       "file are skipped and counted",
                example="python prepare.py mimic --reports mimic-cxr-reports --images mimic-1024 --out training.csv")
    p.add_argument("--reports", required=True, help="folder holding files/pXX/pSUBJECT/sSTUDY.txt")
    p.add_argument("--images", required=True, help="MIMIC-CXR-JPG folder holding files/pXX/...")
    p.add_argument("--metadata", default=None, help="mimic-cxr-2.0.0-metadata.csv[.gz] (each image's view)")
    p.add_argument("--views", default="", help="keep only these views, e.g. PA,AP (default: every view, as the paper)")
    p.add_argument("--sections", default="",
                   help="keep only these report sections, e.g. findings,impression (default: the whole report)")
    p.add_argument("--out", default="training.csv", help="the CSV to write (default training.csv)")

    p = command(sub, "siim-masks", "SIIM-ACR run-length masks -> one PNG mask a film, for finetune.py --task segment",
                reads="Kaggle's train-rle.csv: header 'ImageId, EncodedPixels', one row a region, '-1' for none",
                writes="OUT/<ImageId>.png, 0 or 255, --size pixels square, the regions of a film unioned "
                       "(finetune.py --mask_root OUT)",
                example="python prepare.py siim-masks --rle siim/train-rle.csv --out siim/masks")
    p.add_argument("--rle", required=True, help="Kaggle's train-rle.csv")
    p.add_argument("--out", required=True, help="folder of the masks (made if missing)")
    p.add_argument("--size", type=bounded(int, 1), default=1024,
                   help="image side the run lengths refer to (default 1024)")

    args = parser.parse_args(argv)
    with one_line_errors("prepare.py"):
        if args.command == "synth":
            write_synthetic(args.out, args.n, args.size, args.seed)
        elif args.command == "resize":
            sys.exit(1 if resize_dataset(args.src, args.dst, args.size, args.workers) else 0)
        elif args.command == "mimic":
            convert_mimic(args.reports, args.images, args.out, args.metadata,
                          views=[v.strip().upper() for v in args.views.split(",") if v.strip()] or None,
                          sections=[v.strip() for v in args.sections.split(",") if v.strip()] or None)
        else:
            write_siim_masks(args.rle, args.out, args.size)


def command(sub, name: str, summary: str, reads: str, writes: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help gives its summary, then what it reads, what it writes and an example."""
    def para(head, text):
        return textwrap.fill(text, 100, initial_indent=f"{head:9}", subsequent_indent=" " * 9)

    epilog = "\n".join([para("reads:", reads), para("writes:", writes), f"{'example:':9}{example}"])
    return sub.add_parser(name, help=summary, description=summary, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


# -----------------------------------------------------------------------------
# Plumbing


def _write_atomic_csv(path, header, rows):
    """Write to a temporary file and rename it over `path`: a stopped run never leaves half a CSV."""
    with atomic(str(path)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


if __name__ == "__main__":
    main()
