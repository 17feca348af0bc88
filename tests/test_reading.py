"""experiments/reading.py: the linear read's d', the toy task's strength, and the side-word probe's masking."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import reading  # noqa: E402

import data  # noqa: E402
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
    reports = [data.synth_report(i) for i in range(200)]
    tok = data.train_tokenizer(reports)
    torch.manual_seed(0)
    model = MRM(MRMConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"),
                                      mask_token_id=tok.token_to_id("[MASK]"))).eval()
    found = reading.side_words(model, tok, n=60, repeats=1)
    sided = [i for i in range(reading.FIRST, reading.FIRST + 60)
             if sum("side" in f for f in data.synth_case(i)["findings"].values()) == 1]
    words = sum(data.synth_report(i).lower().replace("-", " ").split().count(w)
                for i in sided for w in ("right", "left"))
    assert found["all"]["words"] == words > 0
    assert sum(r["words"] for k, r in found.items() if k != "all") == words
    assert all(0 <= r[c] <= 1 for r in found.values() for c in ("film", "noise", "other_film"))
