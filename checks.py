"""What pre-training learnt, measured on held-out synthetic records: does the report decoder read the film?

MRM's one idea (Sec. 3.1) is that a report's masked words are restored from the visible words *and* a
global feature of the radiograph, so that the encoder must learn what radiologists write about. The
fusion check asks whether that happened: it restores the masked words of held-out reports twice, once
with each report's own radiograph and once with uniform noise in its place, with the same text and image
masks, and compares the accuracy per group of words:

  side (right, left), size (mild, moderate, small, large), zone (upper, mid, lower, base): what the
  synthetic film decides and the phrasing never does (data.write_report); presence (no and the
  findings' names); other (every other word: phrasing the text alone can tell); all.

"image_only" pools the masked attribute words (side, size, zone) that no visible word of the same
report repeats: they can only come from the film (or from a guess). "with_twin" pools the other masked
attribute words, whose word is still in sight elsewhere in the report and can be copied. A decoder that ignores the film scores
film = noise; one that reads it scores film > noise on image_only.

The pooled spread says how much the fusion's input (the mean of the encoder's patch tokens) differs
between radiographs: the norm of its per-dimension std over films over the norm of its mean. A random
encoder gives about 0.2; near 0, every film gives the same feature and nothing can be read from it.
"""
import numpy as np
import torch
from PIL import Image

import data

CHECK_START = 2_000_000  # held-out synthetic records: pre-training (0..) and fine-tuning (1,000,000..) never see them
WORD_GROUPS = {
    "side": ("right", "left"),
    "size": ("mild", "moderate", "small", "large"),
    "zone": ("upper", "mid", "lower", "base"),
    "presence": ("no", "atelectasis", "cardiomegaly", "consolidation", "effusion", "pneumothorax", "nodule"),
}
ATTRIBUTES = ("side", "size", "zone")  # what a finding's words say about it; presence says whether it is there
GROUPS = list(WORD_GROUPS) + ["other", "all", "image_only", "with_twin"]


def held_out(first: int, n: int, hr: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Records first..first+n-1, each film rendered as pre-training renders it and resized whole to
    hr x hr (no crop, no flip), and its report: ((n, hr, hr) uint8, [str])."""
    films = [data.full_view(Image.fromarray(data.synth_record(i, min(2 * hr, 512), seed)["image"]), hr)
             for i in range(first, first + n)]
    return np.stack(films), [data.synth_report(i, seed) for i in range(first, first + n)]


@torch.no_grad()
def fusion_check(model, tok, films: np.ndarray, reports: list[str], masks_per_report: int = 4, seed: int = 0,
                 batch: int = 100) -> dict:
    """Restore the masked words of `reports` from their `films` (N, 2H, 2W) uint8 and from noise.
    Returns {group: {'film': accuracy, 'noise': accuracy, 'count': masked words scored}} for GROUPS."""
    cfg, device = model.cfg, next(model.parameters()).device
    was_training = model.training
    model.eval()
    group_ids = {g: torch.tensor([i for i in map(tok.token_to_id, words) if i is not None], dtype=torch.long)
                 for g, words in WORD_GROUPS.items()}
    tokens = data.encode_reports(tok, reports, cfg.max_text_len)
    L = (cfg.img_size // cfg.patch_size) ** 2
    rng, gen = np.random.default_rng([seed, 7]), torch.Generator().manual_seed(seed)
    right = {c: dict.fromkeys(GROUPS, 0) for c in ("film", "noise")}
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
            scored = labels != -100
            target = labels[scored]  # (M,), row-major like the model's logits
            # a masked word is in sight elsewhere when the same id is a visible token of its report
            in_sight = (t[:, :, None] == labels[:, None, :]).any(1)[scored]  # (M,)
            sel = {g: torch.isin(target, ids) for g, ids in group_ids.items()}
            attribute = torch.stack([sel[g] for g in ATTRIBUTES]).any(0)
            sel.update(other=~torch.stack(list(sel.values())).any(0), all=torch.ones_like(attribute),
                       image_only=attribute & ~in_sight, with_twin=attribute & in_sight)
            for g, s in sel.items():
                count[g] += int(s.sum())
            for condition, x in (("film", film), ("noise", noise)):
                out = model(x.to(device), t.to(device), labels.to(device), noise=patch_noise.to(device))
                hit = out["mlm_logits"].argmax(-1).cpu() == target
                for g, s in sel.items():
                    right[condition][g] += int(hit[s].sum())
    model.train(was_training)
    return {g: {"film": right["film"][g] / max(1, count[g]), "noise": right["noise"][g] / max(1, count[g]),
                "count": count[g]} for g in GROUPS}


def pooled_spread(encoder, prepare_images, films: np.ndarray) -> float:
    """Spread of the mean post-norm patch token of whole films between films (see the module's text)."""
    pooled = pooled_features(encoder, prepare_images, films)  # (N, D)
    return float(pooled.std(0).norm() / pooled.mean(0).norm())


def summary(check: dict) -> str:
    """One sentence for a person."""
    io = check["image_only"]
    groups = ", ".join(f"{g} {check[g]['film']:.2f} / {check[g]['noise']:.2f}" for g in ("side", "size", "presence"))
    return (f"fusion check: of {io['count']} masked words that only the film can tell, {io['film']:.1%} were restored "
            f"from the film and {io['noise']:.1%} from noise in its place ({groups}, film / noise)")


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


def logistic_regression(x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int = 200):
    """Multi-label logistic regression fitted to convergence (L-BFGS): x (N, D), y (N, K) -> (W (D, K), b (K,))."""
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(features: dict, labels: dict, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1)) -> dict:
    """features, labels: {'train', 'val', 'test'} -> (N, D) tensors and (N, K) 0/1 arrays. Features are
    standardised with the training split's statistics; the weight decay is chosen on validation mean AUC
    and the test split scored once. Returns {'val_auc_mean', 'test_auc_mean', 'weight_decay'}."""
    from finetune import roc_auc  # the project's exact Mann-Whitney AUC

    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    x = {k: (v - mean) / std for k, v in features.items()}
    best = None
    for wd in weight_decays:
        w, b = logistic_regression(x["train"], torch.as_tensor(labels["train"], dtype=torch.float32), wd)
        score = {k: (x[k] @ w + b).numpy() for k in ("val", "test")}
        val = float(np.nanmean(roc_auc(labels["val"], score["val"])))
        if best is None or val > best["val_auc_mean"]:
            best = {"val_auc_mean": val, "test_auc_mean": float(np.nanmean(roc_auc(labels["test"], score["test"]))),
                    "weight_decay": wd}
    return best
