"""curves.py: the training curves drawn with PIL (train.py's and finetune.py's curves.png)."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from machinery import pictures
from machinery.pictures import Panel, Series


def test_ticks_are_round_and_inside():
    assert pictures.ticks(0, 1, log=False) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert pictures.ticks(0.6, 5, log=True) == pytest.approx([1, 2, 5])  # under two decades: 1, 2, 5
    assert pictures.ticks(0.001, 10, log=True) == pytest.approx([0.001, 0.01, 0.1, 1, 10])
    for low, high in ((0.013, 0.0291), (-3.2, 7.7), (1e-6, 3e-5)):
        values = pictures.ticks(low, high, log=False)
        assert 2 <= len(values) <= 6 and all(low <= v <= high for v in values)


def colour_share(image: Image.Image, box, colour: str) -> float:
    """Share of the pixels in box that have exactly the series colour."""
    rgb = np.asarray(image.crop(box)).reshape(-1, 3)
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return float((rgb == target).all(1).mean())


def test_a_line_goes_where_its_values_are(tmp_path):
    """A rising series is drawn low at the left and high at the right of its panel; the second panel,
    empty, still draws; NaN and None are left out; a log axis takes only positive values."""
    path = str(tmp_path / "c.png")
    steps = list(range(0, 101, 10))
    rising = [0.1 * (s + 1) for s in steps]
    pictures.save_curves(path, "title", [
        Panel("rising", [Series("rising", steps, rising), Series("gaps", steps, [None, math.nan] + rising[2:])]),
        Panel("empty", [Series("none", [], [])], log_y=True),
        Panel("log", [Series("with zero", steps, [0.0] + rising[1:])], log_y=True),
    ], panel_size=(300, 200))
    image = Image.open(path).convert("RGB")
    assert image.size == (900, 226) and not (tmp_path / "c.png.tmp.png").exists()
    blue = pictures.COLOURS[0]
    # the plotting area of the first panel: x 58..290, y 50..192
    low_left = colour_share(image, (60, 140, 120, 190), blue)
    high_left = colour_share(image, (60, 52, 120, 100), blue)
    high_right = colour_share(image, (230, 52, 288, 100), blue)
    assert low_left > 0 and high_right > 0 and high_left == 0
    assert colour_share(image, (600, 52, 890, 190), blue) > 0  # the log panel drew its positive values


def test_pretraining_and_finetuning_curves_read_their_logs(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": s, "epoch": 1, "lr": 1e-3 * s, "loss": 5 / s, "loss_mim": 0.1 / s, "loss_mlm": 4.9 / s}
             for s in range(10, 101, 10)] + [{"fusion_check": {"records": 3}}]  # not a point
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    pictures.pretraining_curves(str(log), str(tmp_path / "p.png"))
    assert Image.open(tmp_path / "p.png").size[0] == 3 * 380
    ft = tmp_path / "ft.jsonl"
    ft.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "lr": 0.1, "train_loss": None, "val_auc_mean": 0.7},
        {"step": 10, "lr": 0.1, "train_loss": 0.5}, {"step": 20, "lr": 0.1, "train_loss": 0.4},
        {"step": 20, "lr": 0.1, "train_loss": 0.45, "val_auc_mean": 0.75}]))
    pictures.finetuning_curves({"0.1": str(ft), "0.01": str(tmp_path / "missing.jsonl")}, str(tmp_path / "f.png"),
                             "val_auc_mean", "fine-tuning")
    assert Image.open(tmp_path / "f.png").size[0] == 2 * 380
