"""experiments/reading.py: the linear read's d', the toy task's strength, and the side-word probe's masking."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import reading  # noqa: E402

from machinery import synthetic, tokenizer  # noqa: E402
from mrm import MRM, MRMConfig  # noqa: E402


def test_linear_read_of_two_gaussians_gives_their_distance():
    # two unit Gaussians 2 apart along one of 8 dimensions: accuracy Phi(1) = 0.841, d' = 2
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (8000,), generator=g)
    x = torch.randn(8000, 8, generator=g)
    x[:, 3] += 2.0 * y
    accuracy, d = reading.linear_read(x, y)
    assert accuracy == pytest.approx(0.841, abs=0.02) and d == pytest.approx(2.0, abs=0.15)
    accuracy, d = reading.linear_read(torch.randn(8000, 8, generator=g), y)  # nothing to read
    assert accuracy == pytest.approx(0.5, abs=0.03) and abs(d) < 0.15


def test_toy_strength_follows_the_code_scale():
    codes = np.random.default_rng(1).normal(size=(8, 2, reading.DIM)).astype(np.float32)
    assert reading.toy_strength(codes, 1.0, 0.0)[0] == 1.0
    reads = [reading.toy_strength(codes, s, 1.0)[0] for s in (0.3, 0.1, 0.0)]
    assert reads[0] > reads[1] > 0.55 and reads[2] == pytest.approx(0.5, abs=0.04)


def test_side_probe_masks_exactly_the_side_words():
    reports = [synthetic.synth_report(i) for i in range(200)]
    tok = tokenizer.train_tokenizer(reports)
    torch.manual_seed(0)
    model = MRM(MRMConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"),
                                      mask_token_id=tok.token_to_id("[MASK]"))).eval()
    found = reading.side_words(model, tok, n=60, repeats=1)
    sided = [i for i in range(reading.FIRST, reading.FIRST + 60)
             if sum("side" in f for f in synthetic.synth_case(i)["findings"].values()) == 1]
    words = sum(synthetic.synth_report(i).lower().replace("-", " ").split().count(w)
                for i in sided for w in ("right", "left"))
    assert found["all"]["words"] == words > 0
    assert sum(r["words"] for k, r in found.items() if k != "all") == words
    assert all(0 <= r[c] <= 1 for r in found.values() for c in ("film", "noise", "other_film"))


def test_oracle_features_tell_every_attribute_and_nothing_else():
    indices = range(400)
    f = reading.oracle_features(indices)
    cases = [synthetic.synth_case(i)["findings"] for i in indices]
    plain = [{k: {a: v[a] for a in ("side", "size", "zone") if a in v} for k, v in c.items()} for c in cases]
    same = [(i, j) for i in range(400) for j in range(i) if plain[i] == plain[j]]
    assert same and all(torch.equal(f[i], f[j]) for i, j in same)  # the same findings: the same feature
    side = [(i, c["pleural effusion"]["side"] == "left") for i, c in enumerate(cases) if "pleural effusion" in c]
    rows, y = torch.tensor([i for i, _ in side]), torch.tensor([int(s) for _, s in side])
    assert reading.linear_read(f[rows], y)[0] > 0.95  # an effusion's side is plain in it
    assert torch.equal(reading.oracle_features([7, 3])[1], f[3])  # a record's code, whatever else is asked


def test_pixel_features_keep_only_the_visible_patches():
    films = np.random.default_rng(0).integers(0, 256, (6, 128, 128), dtype=np.uint8)
    f = reading.pixel_features(films, 0.75, masks=3, patch=16, seed=0)  # an 8 x 8 grid, 2 x 2 cells each
    assert f.shape == (3, 6, 4 * 64)
    cells = f.view(3, 6, 16, 16).unfold(2, 2, 2).unfold(3, 2, 2)  # (masks, N, 8, 8, 2, 2)
    visible = (cells != 0).any(-1).any(-1)
    assert (visible.sum((-1, -2)) == 16).all()  # 25% of 64 patches, whole, in each film under each mask
    assert not torch.equal(visible[0], visible[1])  # each mask its own
    whole = reading.pixel_features(films, 0.0, masks=1, patch=16, seed=0)[0]
    assert torch.allclose(whole.view(6, 16, 16).unfold(1, 2, 2).unfold(2, 2, 2)[visible[0]],
                          cells[0][visible[0]])  # the visible cells are the whole film's


def test_attribute_ceiling_falls_with_masking():
    # experiments/ceiling.py: whole films tell the findings' side, size and zone well above a guess; a
    # 75%-masked film far less
    import ceiling

    whole, masked = ceiling.attribute_ceiling(800, 0.0), ceiling.attribute_ceiling(800, 0.75)
    assert whole.keys() == masked.keys() and len(whole) == 14  # 13 (finding, attribute) pairs + mean_gain
    assert whole["pleural effusion side"]["accuracy"] > 0.9 and whole["pleural effusion side"]["prior"] < 0.65
    assert whole["mean_gain"] > 0.2 and whole["mean_gain"] > masked["mean_gain"] + 0.1
