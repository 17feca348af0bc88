"""The pictures a run writes, with PIL alone: curves.png, redrawn from log.jsonl at every save (a resumed run draws
its whole history), e.g. save_curves("out/curves.png", "MRM pre-training", [Panel("loss", [Series("L", steps,
losses)], log_y=True)]), and recon.png, the paper's Fig. 3 from checks.reconstruct (docs/pretraining.md)."""
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import recipes
from machinery.files import atomic, read_log

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Series:
    label: str
    x: list
    y: list


@dataclass
class Panel:
    title: str
    series: list = field(default_factory=list)
    log_y: bool = False   # losses span decades: a log axis shows the late progress too
    x_label: str = "step"


def ticks(low: float, high: float, log: bool, n: int = 5) -> list[float]:
    """About n round values between low and high (powers of ten on a log axis)."""
    if log:
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        values = [v for v in (10.0 ** e for e in range(first, last + 1)) if low <= v <= high]
        if len(values) < 3:  # a decade or two: 1, 2, 5 steps
            values = [v for e in range(first, last + 1) for m in (1, 2, 5) if low <= (v := m * 10.0 ** e) <= high]
        return values or [low, high]
    step = 10 ** math.floor(math.log10((high - low) / n))
    step *= next(m for m in (1, 2, 5, 10) if (high - low) / (step * m) <= n)
    return [k * step for k in range(math.ceil(low / step), math.floor(high / step) + 1)]


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple, panel: Panel, font):
    """One chart in box (left, top, right, bottom): axes, grid, ticks, one line a series, a legend."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 58, top + 24, right - 10, bottom - 34  # the plotting area
    draw.text((left + 4, top + 4), panel.title, fill="black", font=font)
    points = [[(x, y) for x, y in zip(s.x, s.y) if y is not None and math.isfinite(y) and (y > 0 or not panel.log_y)]
              for s in panel.series]
    every = [p for pts in points for p in pts]
    if not every:
        draw.text((x0, (y0 + y1) // 2), "nothing logged yet", fill="gray", font=font)
        return
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    xlo, xhi = min(xs), max(xs)
    xhi = xhi if xhi > xlo else xlo + 1
    f = math.log10 if panel.log_y else (lambda v: v)
    ylo, yhi = f(min(ys)), f(max(ys))
    pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 1.0
    ylo, yhi = ylo - pad, yhi + pad
    to_x = lambda v: x0 + (v - xlo) / (xhi - xlo) * (x1 - x0)  # noqa: E731
    to_y = lambda v: y1 - (f(v) - ylo) / (yhi - ylo) * (y1 - y0)  # noqa: E731
    for v in ticks(10 ** ylo if panel.log_y else ylo, 10 ** yhi if panel.log_y else yhi, panel.log_y):
        y = to_y(v)
        draw.line([(x0, y), (x1, y)], fill="#e6e6e6")
        label = f"{v:.3g}"
        draw.text((x0 - 6 - draw.textlength(label, font=font), y - 7), label, fill="black", font=font)
    for v in ticks(xlo, xhi, False):
        x = to_x(v)
        draw.line([(x, y1), (x, y1 + 4)], fill="black")
        label = f"{v:g}"
        draw.text((x - draw.textlength(label, font=font) / 2, y1 + 6), label, fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2 - draw.textlength(panel.x_label, font=font) / 2, y1 + 20), panel.x_label, fill="gray",
              font=font)
    legend_y = y0 + 4
    for k, (series, pts) in enumerate(zip(panel.series, points)):
        colour = COLOURS[k % len(COLOURS)]
        line = [(to_x(x), to_y(y)) for x, y in pts]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line if len(line) <= 12 else []:  # few points (validations): mark each
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if len(panel.series) > 1 or series.label != panel.title:
            width = draw.textlength(series.label, font=font)
            draw.line([(x1 - width - 30, legend_y + 7), (x1 - width - 10, legend_y + 7)], fill=colour, width=2)
            draw.text((x1 - width - 6, legend_y), series.label, fill="black", font=font)
            legend_y += 16


def save_curves(path: str, title: str, panels: list[Panel], panel_size=(380, 260)):
    """Panels side by side under a title, written atomically to path (a PNG)."""
    font = ImageFont.load_default(size=12)
    w, h = panel_size
    sheet = Image.new("RGB", (w * len(panels), h + 26), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), title, fill="black", font=ImageFont.load_default(size=14))
    for k, panel in enumerate(panels):
        draw_panel(draw, (k * w, 26, (k + 1) * w, 26 + h), panel, font)
    with atomic(path, ".png") as tmp:
        sheet.save(tmp)


def pretraining_curves(log_path: str, path: str, title: str = "MRM pre-training"):
    """train.py: L = L_R + lambda L_I, its two parts (Eq. 3) and the lr, against the optimizer step."""
    rows = [r for r in read_log(log_path) if "loss" in r]
    steps = [r["step"] for r in rows]
    L, L_R, L_I, lr = ([r[key] for r in rows] for key in ("loss", "loss_mlm", "loss_mim", "lr"))
    save_curves(path, title, [
        Panel("loss L and report loss L_R", [Series("L", steps, L), Series("L_R (words)", steps, L_R)], log_y=True),
        Panel("image loss L_I (masked patches at 2x)", [Series("L_I", steps, L_I)], log_y=True),
        Panel("learning rate", [Series("learning rate", steps, lr)]),
    ])


def finetuning_run_curves(cfg):
    """finetune.py's --out/curves.png for its run (a finetune.FinetuneConfig), a line per lr of the grid."""
    lrs = recipes.learning_rates(cfg)
    finetuning_curves({f"{lr:g}": os.path.join(cfg.out, f"lr_{lr:g}", "log.jsonl") for lr in lrs},
                      os.path.join(cfg.out, "curves.png"), "val_auc_mean" if cfg.task == "classify" else "val_dice",
                      f"fine-tuning on {cfg.dataset} ({cfg.task}, {cfg.ratio}% labels)")


def finetuning_curves(run_logs: dict, path: str, metric: str, title: str):
    """finetune.py's training loss and validation score against the step, a line per {lr label: log.jsonl path}."""
    loss, val = [], []
    for label, log in run_logs.items():
        rows = read_log(log)
        points = [r for r in rows if metric not in r and r.get("train_loss") is not None]
        scored = [r for r in rows if metric in r]
        loss.append(Series(f"lr {label}", [r["step"] for r in points], [r["train_loss"] for r in points]))
        val.append(Series(f"lr {label}", [r["step"] for r in scored], [r[metric] for r in scored]))
    name = {"val_auc_mean": "mean AUC", "val_dice": "Dice"}.get(metric, metric)
    save_curves(path, title, [Panel("training loss", loss, log_y=True), Panel(f"validation {name}", val)])


# -----------------------------------------------------------------------------
# recon.png (Fig. 3)


def words(tok, ids, colours=None) -> list[tuple[str, str]]:
    """Token ids -> [(text, colour)], word pieces ('##ing') glued to the previous piece, [CLS] and [PAD] dropped."""
    out = []
    for n, i in enumerate(ids):
        t = tok.id_to_token(int(i))
        if t == "[PAD]":
            break
        if t != "[CLS]":
            out.append((t[2:] if t.startswith("##") else " " + t, colours[n] if colours else "black"))
    return out


def draw_words(draw, font, x, y, width, title, pieces) -> int:
    """Wrap coloured pieces into `width` pixels from (x, y); returns the y below the text."""
    line_h = font.size + 4
    draw.text((x, y), title, fill="gray", font=font)
    y += line_h
    cx = x
    for text, colour in pieces:
        if cx + draw.textlength(text, font=font) > x + width and cx > x:
            cx, y, text = x, y + line_h, text.lstrip()
        draw.text((cx, y), text, fill=colour, font=font)
        cx += draw.textlength(text, font=font)
    return y + line_h + 6


def save_recon(r: dict, tok, path: str, panel: int = 256, text_w: int = 720):
    """recon.png from r = checks.reconstruct(model, dataset): a row a record, images left, the report thrice right."""
    columns = [r[k] for k in ("masked", "restored", "original") if k in r]
    font = ImageFont.load_default(size=13)
    rows = []
    for b in range(len(r["tokens"])):
        row = Image.new("RGB", (len(columns) * panel + text_w, 2 * panel), "white")
        for c, col in enumerate(columns):
            arr = (col[b, 0].cpu().numpy() * 255).round().astype(np.uint8)
            row.paste(Image.fromarray(arr).resize((panel, panel), Image.BICUBIC), (c * panel, 0))
        draw, x = ImageDraw.Draw(row), len(columns) * panel + 10
        y = draw_words(draw, font, x, 4, text_w - 20, "masked report", words(tok, r["tokens"][b]))
        if "restored_ids" in r:
            scored = r["labels"][b] != -100
            colours = ["black" if not s else "green" if ok else "red" for s, ok in zip(scored, r["right"][b])]
            y = draw_words(draw, font, x, y, text_w - 20, "restored (green right, red wrong)",
                           words(tok, r["restored_ids"][b], colours))
        original = torch.where(r["labels"][b] != -100, r["labels"][b], r["tokens"][b])
        y = draw_words(draw, font, x, y, text_w - 20, "original report", words(tok, original))
        rows.append(row.crop((0, 0, row.width, max(panel, y))))
    sheet = Image.new("RGB", (rows[0].width, sum(row.height for row in rows) + 24), "white")
    title = " | ".join(k for k in ("masked input", "restored", "original") if k.split()[0] in r)
    ImageDraw.Draw(sheet).text((10, 4), title, fill="gray", font=font)
    y = 24
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    with atomic(path, ".png") as tmp:
        sheet.save(tmp)
