"""What pre-training learnt, measured on held-out synthetic records: does the report decoder read the film?

MRM's one idea (Sec. 3.1) is that a report's masked words are restored from the visible words *and* a
global feature of the radiograph, so that the encoder must learn what radiologists write about. The
fusion check asks whether that happened: it restores the masked words of held-out reports three times,
with each report's own radiograph, with uniform noise in its place, and with another report's radiograph
(other_film), with the same text and image masks, and compares the accuracy per group of words:

  side (right, left), size (mild, moderate, small, large), zone (upper, mid, lower, base): what the
  synthetic film decides and the phrasing never does (synthetic.write_report); presence (no and the
  findings' names); other (every other word: phrasing the text alone can tell); all.

"image_only" pools the masked attribute words (side, size, zone) that no visible word of the same
report repeats: they can only come from the film (or from a guess). "with_twin" pools the other masked
attribute words, whose word is still in sight elsewhere in the report and can be copied. A decoder that
ignores the film scores film = noise = other_film; one that reads it scores film above both on
image_only. other_film is the stricter control: noise is unlike any film, so a decoder could score
film > noise only because noise throws it off; another real film throws it off only if it reads what
that film shows.

The pooled spread says how much the fusion's input (the mean of the encoder's patch tokens) differs
between radiographs: the norm of its per-dimension std over films over the norm of its mean. A random
encoder gives about 0.2; near 0, every film gives the same feature and nothing can be read from it.

Below the fusion check: a linear probe of frozen features, the ceiling a linear read of the visible
pixels sets, the fine-tuning metrics (ROC-AUC with ties, Dice) and the reconstruction of train.py's
recon.png (Fig. 3).
"""
import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
from machinery import runs, synthetic
from mrm import MRM, patchify, unpatchify

CHECK_START = 2_000_000  # held-out synthetic records: pre-training (0..) and fine-tuning (1,000,000..) never see them
WORD_GROUPS = {
    "side": ("right", "left"),
    "size": ("mild", "moderate", "small", "large"),
    "zone": ("upper", "mid", "lower", "base"),
    "presence": ("no", "atelectasis", "cardiomegaly", "consolidation", "effusion", "pneumothorax", "nodule"),
}
ATTRIBUTES = ("side", "size", "zone")  # what a finding's words say about it; presence says whether it is there
GROUPS = list(WORD_GROUPS) + ["other", "all", "image_only", "with_twin"]
CONDITIONS = ("film", "noise", "other_film")  # what stands in the radiograph's place


def films_of(indices, hr: int, seed: int = 0) -> np.ndarray:
    """Synthetic records' films, each rendered as pre-training renders it and resized whole to hr x hr
    (no crop, no flip): (len(indices), hr, hr) uint8."""
    return np.stack([data.full_view(Image.fromarray(synthetic.synth_record(i, min(2 * hr, 512), seed)["image"]), hr)
                     for i in indices])


def held_out(first: int, n: int, hr: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Records first..first+n-1: their films (films_of) and reports: ((n, hr, hr) uint8, [str])."""
    return films_of(range(first, first + n), hr, seed), [synthetic.synth_report(i, seed) for i in range(first, first + n)]


def group_token_ids(tok) -> dict:
    """{group: ids of its words} for WORD_GROUPS (words the tokenizer lacks are left out)."""
    return {g: torch.tensor([i for i in map(tok.token_to_id, words) if i is not None], dtype=torch.long)
            for g, words in WORD_GROUPS.items()}


def word_groups(tokens: torch.Tensor, labels: torch.Tensor, group_ids: dict) -> tuple[torch.Tensor, dict]:
    """tokens (B, T) with [MASK] in place, labels (B, T) (-100 where not masked) -> the masked words'
    targets (M,), row-major like the model's logits, and {group: (M,) bool} for GROUPS."""
    scored = labels != -100
    target = labels[scored]
    # a masked word is in sight elsewhere when the same id is a visible token of its report
    in_sight = (tokens[:, :, None] == labels[:, None, :]).any(1)[scored]  # (M,)
    sel = {g: torch.isin(target, ids) for g, ids in group_ids.items()}
    attribute = torch.stack([sel[g] for g in ATTRIBUTES]).any(0)
    sel.update(other=~torch.stack(list(sel.values())).any(0), all=torch.ones_like(attribute),
               image_only=attribute & ~in_sight, with_twin=attribute & in_sight)
    return target, sel


@torch.no_grad()
def fusion_check(model, tok, films: np.ndarray, reports: list[str], masks_per_report: int = 4, seed: int = 0,
                 batch: int = 100) -> dict:
    """Restore the masked words of `reports` from their `films` (N, 2H, 2W) uint8 and from noise.
    Returns {group: {'film', 'noise', 'other_film': accuracy, 'count': masked words scored}} for GROUPS.
    'other_film' gives each report the film of the next report in its batch of `batch`."""
    cfg, device = model.cfg, next(model.parameters()).device
    was_training = model.training
    model.eval()
    group_ids = group_token_ids(tok)
    tokens = data.encode_reports(tok, reports, cfg.max_text_len)
    L = (cfg.img_size // cfg.patch_size) ** 2
    rng, gen = np.random.default_rng([seed, 7]), torch.Generator().manual_seed(seed)
    right = {c: dict.fromkeys(GROUPS, 0) for c in CONDITIONS}
    count = dict.fromkeys(GROUPS, 0)
    for _ in range(masks_per_report):
        for start in range(0, len(reports), batch):
            rows = slice(start, start + batch)
            masked = [data.mask_report(t, cfg.text_mask_ratio, rng, cfg.mask_token_id, cfg.pad_token_id)
                      for t in tokens[rows]]
            t = torch.from_numpy(np.stack([m[0] for m in masked]).astype(np.int64))  # (B, T)
            labels = torch.from_numpy(np.stack([m[1] for m in masked]).astype(np.int64))
            film = torch.from_numpy(films[rows])[:, None]
            noise = torch.randint(0, 256, film.shape, generator=gen, dtype=torch.uint8)
            patch_noise = torch.rand(len(film), L, generator=gen)  # one image mask for both conditions
            target, sel = word_groups(t, labels, group_ids)
            for g, s in sel.items():
                count[g] += int(s.sum())
            # another held-out record's film: real, but not this report's (a decoder that reads the film is
            # misled by it; one that only tells real films from noise is not)
            for condition, x in (("film", film), ("noise", noise), ("other_film", film.roll(1, 0))):
                out = model(x.to(device), t.to(device), labels.to(device), noise=patch_noise.to(device))
                hit = out["mlm_logits"].argmax(-1).cpu() == target
                for g, s in sel.items():
                    right[condition][g] += int(hit[s].sum())
    model.train(was_training)
    return {g: {**{c: right[c][g] / max(1, count[g]) for c in CONDITIONS}, "count": count[g]} for g in GROUPS}


def pooled_spread(encoder, prepare_images, films: np.ndarray) -> float:
    """Spread of the mean post-norm patch token of whole films between films (see the module's text)."""
    pooled = pooled_features(encoder, prepare_images, films)  # (N, D)
    return float(pooled.std(0).norm() / pooled.mean(0).norm())


@functools.lru_cache(maxsize=1)
def held_out_records(n: int, hr: int, seed: int):
    """The fusion check's films and reports, rendered once a run however often it checks."""
    return held_out(CHECK_START, n, hr, seed)


def logged_fusion_check(model: MRM, tok, n: int, seed: int, log_path: str, epoch: int, step: int,
                        at_end: bool = False) -> dict:
    """train.py's check of MRM's idea on n held-out records: are the masked words restored better from
    their own film than from noise, and does the pooled image feature still differ between films? Writes
    one log.jsonl line {"fusion_check": {...}} and prints one sentence. A check during the run
    (--fusion_every) also names its epoch at the line's top level, so that a resumed run keeps the checks
    before its start; the end's check is the run's and goes when the run is continued."""
    films, reports = held_out_records(n, 2 * model.cfg.img_size, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_encoder = MRM(model.cfg).encoder.to(next(model.parameters()).device)  # as the run began
    result = {"records": n, "epoch": epoch, "step": step,
              "pooled_spread": {"trained": pooled_spread(model.encoder, model.prepare_images, films),
                                "random": pooled_spread(random_encoder, model.prepare_images, films)}}
    if model.report_decoder is not None:
        result.update(fusion_check(model, tok, films, reports, seed=seed))
        print(f"epoch {epoch}: " + summary(result))
    spread = result["pooled_spread"]
    print(f"pooled image feature spread between films: {spread['trained']:.3f} "
          f"(a random encoder: {spread['random']:.3f})")
    runs.append_log(log_path, {"fusion_check": result} if at_end else {"epoch": epoch, "fusion_check": result})
    return result


def summary(check: dict) -> str:
    """One sentence for a person."""
    io = check["image_only"]
    groups = ", ".join(f"{g} {check[g]['film']:.2f} / {check[g]['noise']:.2f}" for g in ("side", "size", "presence"))
    return (f"fusion check: of {io['count']} masked words that only the film can tell, {io['film']:.1%} were restored "
            f"from the film, {io['noise']:.1%} from noise in its place and {io['other_film']:.1%} from another "
            f"report's film ({groups}, film / noise)")


# -----------------------------------------------------------------------------
# A linear probe: what the frozen encoder's pooled feature tells about the findings, without fine-tuning


@torch.no_grad()
def pooled_features(encoder, prepare_images, films: np.ndarray, batch: int = 200) -> torch.Tensor:
    """(N, 2H, 2W) uint8 whole films -> (N, D): the mean of the encoder's post-norm patch tokens, unmasked."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = [encoder(prepare_images(torch.from_numpy(films[k:k + batch])[:, None].to(device))[2])[:, 1:].mean(1).cpu()
           for k in range(0, len(films), batch)]
    encoder.train(was_training)
    return torch.cat(out).float()


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
    """features, labels: {'train', 'val'} and optionally 'test' -> (N, D) tensors and (N, K) 0/1 arrays.
    Features are standardised with the training split's statistics; the weight decay is chosen on
    validation mean AUC and the test split, if given, scored once. Returns {'val_auc_mean',
    'test_auc_mean' (with a test split), 'weight_decay', 'w' (D, K), 'b' (K,), 'mean', 'std' (D,)}: the
    probe scores (f - mean) / std @ w + b."""
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


# -----------------------------------------------------------------------------
# What a masked film shows: a linear read of its visible pixels, for the image-only words


def softmax_regression(x: torch.Tensor, y: torch.Tensor, k: int, weight_decay: float, steps: int = 300):
    """Multinomial logistic regression: x (N, D), y (N,) in 0..k-1 -> (W (D, k), b (k,))."""
    return fit_linear(x, y, k, torch.nn.functional.cross_entropy, weight_decay, steps)


def attribute_ceiling(n: int = 3000, mask_ratio: float = 0.75, img_size: int = 64, patch: int = 8, seed: int = 0,
                      first: int = CHECK_START + 5000, weight_decays=(1e-3, 1e-2, 1e-1)) -> dict:
    """How well each finding's side, size and zone can be told, by a linear read, from what a film masked
    as in pre-training leaves visible: n held-out films at the model's input size, each with its own
    random patch mask (masked patches set to mid-grey); features are 4 x 4-pixel means and the mask
    itself. Per (finding, attribute), among the films that show the finding: a multinomial logistic
    regression fitted on half, its weight decay chosen on a quarter, scored on the last quarter, beside
    the prior (always guessing the most common value). Returns {'finding attribute': {'accuracy', 'prior'},
    'mean_gain': mean of accuracy - prior}: how far above a guess a linear reader of the masked film
    restores the image-only words (each attribute weighted alike). Not an upper bound: a measure of the trace."""
    films, _ = held_out(first, n, 2 * img_size, seed)
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
        for attribute in ATTRIBUTES:
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


# -----------------------------------------------------------------------------
# Metrics of fine-tuning: pure numpy, checked against hand-worked values in tests/test_finetune.py


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
# The reconstruction (Fig. 3), which train.py draws as recon.png (machinery/pictures.py): masked input,
# restored image, original; masked, restored and original report.


@torch.no_grad()
def reconstruct(model: MRM, dataset: data.PretrainDataset, n: int = 4) -> dict:
    """Run the model on the first n records, whole images, fixed masks. Returns images (B, 1, 2H, 2W) in
    [0, 1]: 'masked' input, 'restored' (restored patches + visible ones, if there is an image decoder),
    'original'; and token rows: 'tokens' (masked report), 'restored_ids', 'right' (bool), 'labels'."""
    cfg, device = model.cfg, next(model.parameters()).device
    hr, p = 2 * cfg.img_size, cfg.patch_size
    rng = np.random.default_rng(0)  # the same records and masks every time: pictures compare across epochs
    imgs, toks, labels = [], [], []
    for i in range(min(n, len(dataset))):
        img, j, _ = dataset.load(i)
        imgs.append(data.full_view(img, hr))
        t, l = data.mask_report(dataset.tokens[j], cfg.text_mask_ratio, rng, dataset.mask_id, dataset.pad_id)
        toks.append(t)
        labels.append(l)
    images = torch.from_numpy(np.stack(imgs))[:, None].to(device)
    tokens, labels = torch.from_numpy(np.stack(toks)).long(), torch.from_numpy(np.stack(labels)).long()
    noise = torch.from_numpy(rng.random((len(imgs), dataset.num_patches), dtype=np.float32))
    was_training = model.training
    model.eval()
    out = model(images, tokens.to(device), labels.to(device), noise=noise)
    model.train(was_training)
    high, low, _ = model.prepare_images(images)
    G = cfg.img_size // p
    # where the picture shows a prediction: the removed patches (every patch when nothing is removed,
    # as the loss then scores them all)
    shown = out["mask"] if cfg.mask_ratio > 0 else torch.ones_like(out["mask"])
    shown = shown.reshape(-1, 1, G, G).repeat_interleave(2 * p, 2).repeat_interleave(2 * p, 3)
    result = {"masked": F.interpolate(low, scale_factor=2, mode="nearest") * (1 - shown) + 0.5 * shown,
              "original": high, "tokens": tokens, "labels": labels}
    if "pred" in out:
        pred, size = out["pred"].float(), 2 * p if cfg.super_resolution else p
        if cfg.norm_pix_loss:  # the decoder predicts normalised patches: undo with the target's statistics
            target = patchify(high if cfg.super_resolution else low, size)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        restored = unpatchify(pred, size, high.shape[1])
        if not cfg.super_resolution:
            restored = F.interpolate(restored, scale_factor=2, mode="bicubic")
        result["restored"] = (restored * shown + high * (1 - shown)).clamp(0, 1)
    if "mlm_logits" in out:  # the guesses, in the row-major order of labels != -100
        scored = labels != -100
        result["restored_ids"] = tokens.masked_scatter(scored, out["mlm_logits"].argmax(-1).cpu())
        result["right"] = result["restored_ids"] == torch.where(scored, labels, tokens)
    return result
