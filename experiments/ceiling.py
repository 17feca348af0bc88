"""How much of a report's image-only words a masked film can tell, by a linear read of its visible pixels.

MRM restores a report's masked words from the visible words and a pooled feature of the *masked* film
(75% of the patches removed, Sec. 3.1). On the synthetic records, checks.attribute_ceiling fits, per
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checks  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="held-out films")
    parser.add_argument("--mask_ratios", default="0.75,0.5,0", help="comma-separated")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.mask_ratios.split(",")]
    found = {r: checks.attribute_ceiling(args.n, r) for r in ratios}
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
