"""How much of a report's image-only words a masked film can tell, by a linear read of its visible pixels.

MRM restores a report's masked words from the visible words and a pooled feature of the *masked* film
(75% of the patches removed, Sec. 3.1). On the synthetic records, attribute_ceiling fits, per
finding and attribute (side, size, zone), a logistic regression on the pixels a masked film leaves
visible, and prints its held-out accuracy beside always guessing the commonest value. The mean gain is
how far above a guess a linear reader of the masked film restores image-only words, trained on about
400 films per attribute. It is not an upper bound (a reader trained on more films may do better) but
a measure of how faint the trace is; the fusion check's target of film - noise >= 0.10 asks for more.

    python experiments/ceiling.py                      # 3,000 films, masking 0.75, 0.5 and none: about 2 min
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checks  # noqa: E402
import metrics  # noqa: E402
from machinery import synthetic  # noqa: E402


def softmax_regression(x: torch.Tensor, y: torch.Tensor, k: int, weight_decay: float, steps: int = 300):
    """Multinomial logistic regression: x (N, D), y (N,) in 0..k-1 -> (W (D, k), b (k,))."""
    return metrics.fit_linear(x, y, k, torch.nn.functional.cross_entropy, weight_decay, steps)


def attribute_ceiling(n: int = 3000, mask_ratio: float = 0.75, img_size: int = 64, patch: int = 8, seed: int = 0,
                      first: int = checks.CHECK_START + 5000, weight_decays=(1e-3, 1e-2, 1e-1)) -> dict:
    """How well each finding's side, size and zone can be told, by a linear read, from what a film masked
    as in pre-training leaves visible: n held-out films at the model's input size, each with its own
    random patch mask (masked patches set to mid-grey); features are 4 x 4-pixel means and the mask
    itself. Per (finding, attribute), among the films that show the finding: a multinomial logistic
    regression fitted on half, its weight decay chosen on a quarter, scored on the last quarter, beside
    the prior (always guessing the most common value). Returns {'finding attribute': {'accuracy', 'prior'},
    'mean_gain': mean of accuracy - prior}: how far above a guess a linear reader of the masked film
    restores the image-only words (each attribute weighted alike). Not an upper bound: a measure of the trace."""
    films, _ = checks.held_out(first, n, 2 * img_size, seed)
    cases = [synthetic.synth_case(i, seed) for i in range(first, first + n)]
    x = torch.from_numpy(films)[:, None].float() / 255
    low = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bicubic", antialias=True)[:, 0].clamp(0, 1)
    grid = img_size // patch
    keep = (torch.rand(n, grid, grid, generator=torch.Generator().manual_seed(seed)) >= mask_ratio).float()
    pixels = keep.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    seen = low * pixels + 0.5 * (1 - pixels)
    features = torch.cat([torch.nn.functional.avg_pool2d(seen[:, None], 4).flatten(1), keep.flatten(1)], 1)
    result, gains = {}, []
    for name in synthetic.FINDINGS:
        for attribute in checks.ATTRIBUTES:
            rows = [k for k, c in enumerate(cases) if attribute in c["findings"].get(name, {})]
            if len(rows) < 40:
                continue
            values = sorted({cases[k]["findings"][name][attribute] for k in rows})
            y = torch.tensor([values.index(cases[k]["findings"][name][attribute]) for k in rows])
            f = features[rows]
            a, b = len(rows) // 2, len(rows) * 3 // 4
            mean, std = f[:a].mean(0), f[:a].std(0) + 1e-6
            f = (f - mean) / std
            best = None
            for wd in weight_decays:
                w, bias = softmax_regression(f[:a], y[:a], len(values), wd)
                right = ((f @ w + bias).argmax(1) == y).float()
                if best is None or right[a:b].mean() > best[0]:
                    best = (right[a:b].mean(), float(right[b:].mean()))
            prior = float((y[b:] == torch.bincount(y[:a], minlength=len(values)).argmax()).float().mean())
            result[f"{name} {attribute}"] = {"accuracy": best[1], "prior": prior}
            gains.append(best[1] - prior)
    result["mean_gain"] = float(np.mean(gains))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="held-out films")
    parser.add_argument("--mask_ratios", default="0.75,0.5,0", help="comma-separated")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.mask_ratios.split(",")]
    found = {r: attribute_ceiling(args.n, r) for r in ratios}
    keys = [k for k in found[ratios[0]] if k != "mean_gain"]
    print("| finding attribute | prior | " + " | ".join(f"masked {r:g}" for r in ratios) + " |")
    print("| --- | --- |" + " --- |" * len(ratios))
    for k in keys:
        print(f"| {k} | {found[ratios[0]][k]['prior']:.2f} | "
              + " | ".join(f"{found[r][k]['accuracy']:.2f}" for r in ratios) + " |")
    print("| mean gain over the prior | | " + " | ".join(f"{found[r]['mean_gain']:+.3f}" for r in ratios) + " |")
    return found


if __name__ == "__main__":
    main()
