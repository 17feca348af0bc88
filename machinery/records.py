"""Text files read strictly: UTF-8 lines, CSV rows with their line numbers, the released training.csv checked first."""
import csv
import os

from machinery.console import progress
from machinery.errors import BadRecord


def text_lines(path):
    """Lines of a UTF-8 file, each ending in \\n (after \\n, \\r\\n or \\r); a guessed encoding may change words."""
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
    """(line where the row starts, row) for each row of a UTF-8 CSV; a row csv cannot read is refused with its line."""
    reader = csv.reader(text_lines(path))
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise BadRecord(f"{path}, line {start}: not a readable CSV row ({e})") from None


def training_csv_rows(csv_path, image_root, skip_bad: bool = False):
    """The released training.csv (image_path,report_content, paths under image_root), its columns, empty reports and
    missing images checked: (paths, reports, the CSV line of each, rows skipped)."""
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
    if problems and not skip_bad:  # the first line says it all (the count, the first); the rest follow it
        more = "\n  ".join(problems[1:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise BadRecord(f"{len(problems)} bad rows (use --skip_bad to skip them), the first: {problems[0]}"
                        + (f"; the others:\n  {more}" if more else ""))
    if not paths:
        raise BadRecord(f"{csv_path}: no usable rows")
    return paths, reports, lines, len(problems)
