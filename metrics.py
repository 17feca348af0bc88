"""How an encoder is scored: ROC-AUC per label (with ties) and Dice per image, the fine-tuning metrics of the
paper's tables (Sec. 4.2; the SIIM-ACR rule for an empty truth), and a linear probe of frozen features scored
by its mean AUC. Pure functions, checked against hand-worked values in tests/test_finetune.py."""
import warnings

import numpy as np
import torch


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """ROC-AUC per label: (N,) or (N, K) 0/1 truths and scores -> a float or (K,). Exact with ties: the
    Mann-Whitney statistic on average ranks, i.e. P(score of a positive > a negative) + P(tie) / 2.
    NaN for a label whose truths hold one class."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    if y_true.ndim == 1:
        return roc_auc(y_true[:, None], y_score[:, None])[0]
    aucs = np.full(y_true.shape[1], np.nan)
    for k in range(y_true.shape[1]):
        positive = y_true[:, k] > 0.5
        n_pos, n_neg = positive.sum(), (~positive).sum()
        if n_pos and n_neg:
            ranks = _average_ranks(y_score[:, k])
            aucs[k] = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return aucs


def mean_auc(aucs: np.ndarray, names, split: str = "") -> float:
    """The mean over labels that have both classes; a label left out is named in a warning."""
    for name, auc in zip(names, aucs):
        if np.isnan(auc):
            warnings.warn(f"{split} label {name!r} has one class only: its AUC is undefined, left out of the mean")
    return float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan")


def auc_table(names, values, title: str) -> str:
    """One line per label, 'name  AUC' in aligned columns, under a title line."""
    width = max(len(n) for n in [*names, title]) + 2
    return "\n".join([f"{title:<{width}}{'AUC':>7}", *(f"{n:<{width}}{v:7.4f}" for n, v in zip(names, values))])


def dice_per_image(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, H, W) bool predictions and truths -> (N,) Dice, 2|P & T| / (|P| + |T|). An empty truth scores 1
    if the prediction is empty too, else 0 (the SIIM-ACR rule)."""
    pred, target = np.asarray(pred, bool).reshape(len(pred), -1), np.asarray(target, bool).reshape(len(target), -1)
    both = (pred & target).sum(1)
    total = pred.sum(1) + target.sum(1)
    return np.where(total == 0, 1.0, 2 * both / np.maximum(total, 1))


# -----------------------------------------------------------------------------
# A linear probe: what frozen features tell about the findings, without fine-tuning


def fit_linear(x: torch.Tensor, y: torch.Tensor, k: int, loss_fn, weight_decay: float, steps: int):
    """A linear map x (N, D) -> (N, k) logits fitted to convergence (L-BFGS) on loss_fn(logits, y) plus
    weight_decay * |W|^2. Returns (W (D, k), b (k,))."""
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(x @ w + b, y) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def logistic_regression(x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int = 200):
    """Multi-label logistic regression: x (N, D), y (N, K) 0/1 -> (W (D, K), b (K,))."""
    return fit_linear(x, y, y.shape[1], torch.nn.functional.binary_cross_entropy_with_logits, weight_decay, steps)


def linear_probe(features: dict, labels: dict, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1)) -> dict:
    """features, labels: {'train', 'val'} and optionally 'test' -> (N, D) tensors and (N, K) 0/1 arrays. Features
    are standardised with the training split's statistics; the weight decay is chosen on validation mean AUC and the
    test split, if given, scored once. Returns {'val_auc_mean', 'test_auc_mean' (with a test split), 'weight_decay',
    'w' (D, K), 'b' (K,), 'mean', 'std' (D,)}: the probe scores (f - mean) / std @ w + b."""
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    x = {k: (v - mean) / std for k, v in features.items()}
    best = None
    for wd in weight_decays:
        w, b = logistic_regression(x["train"], torch.as_tensor(labels["train"], dtype=torch.float32), wd)
        val = float(np.nanmean(roc_auc(labels["val"], (x["val"] @ w + b).numpy())))
        if best is None or val > best["val_auc_mean"]:
            best = {"val_auc_mean": val, "weight_decay": wd, "w": w, "b": b, "mean": mean, "std": std}
    if "test" in x:
        test = (x["test"] @ best["w"] + best["b"]).numpy()
        best["test_auc_mean"] = float(np.nanmean(roc_auc(labels["test"], test)))
    return best
