"""Why the report decoder does not read the film: five measurements behind experiments/README.md,
"Where the film is lost".

MRM fuses one global feature of the masked radiograph (the mean of the encoder's visible patch tokens,
Sec. 3.1) into the report decoder. On the synthetic records the fusion check finds film = noise. These
measurements locate the loss:

    python experiments/reading.py side out/ckpt.pt      # only the side words masked: film, noise, other film
    python experiments/reading.py feature out/ckpt.pt   # how strongly the fused feature tells a finding's side
    python experiments/reading.py sweep                 # how strong that must be for the decoder to read it
    python experiments/reading.py decoder               # the decoder alone on a frozen encoder, for many steps
    python experiments/reading.py reader                # the decoder alone on the masked pixels (or an oracle)

`side`: held-out reports with exactly one finding that has a side; every 'right' / 'left' masked, every
other word visible, so the finding and its phrasing are in sight and only the film can tell the side.
`feature`: the fused feature (fusion_proj of the pooled tokens) of held-out films under several patch
masks: its norm, how much of its variance is the film and how much the mask, and how well a linear
read (logistic regression, fitted on half the films, scored on the rest) tells a pleural effusion's side,
as an accuracy and as d' (the class distance, in standard deviations, that gives that accuracy).
`sweep`: a toy report (finding, side pairs, as tests/test_checks.py) whose feature tells each side at a
chosen strength, measured by the same linear read; the tiny report decoder is trained on it alone and
scored on the side words.
`decoder`: the report decoder and fusion projection trained alone (L_R, the demo's lr and schedule) on
cached pooled features of a frozen encoder (random, or a checkpoint's), scored every --every steps on
the fusion check's image-only words with each report's film and with another's.
`reader`: a new report decoder and projection trained alone for the demo's 640 steps on features of
known content: the masked film's own visible pixels (`--feature pixels`, at `--mask_ratio`), or an oracle
code of every finding and attribute (`--feature oracle`): how far a decoder gets in the demo's budget
from a feature that holds the masked film as plainly as its pixels do, and from a perfect one.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checks  # noqa: E402
import data  # noqa: E402
import recipes  # noqa: E402
from machinery import synthetic  # noqa: E402
from machinery.tokenizer import train_tokenizer  # noqa: E402
from ceiling import softmax_regression  # noqa: E402
from miniature import load_model  # noqa: E402
from mrm import MRM, MRMConfig, ReportDecoder, global_pool, init_weights, random_masking  # noqa: E402

FIRST = checks.CHECK_START + 20_000  # held-out records no other check uses


def load(path: str) -> tuple[MRM, object]:
    """A train.py checkpoint's model (eval mode) and its tokenizer."""
    from tokenizers import Tokenizer
    model, ckpt = load_model(path)
    return model, Tokenizer.from_str(ckpt["tokenizer"])


@torch.no_grad()
def fused(model: MRM, films: np.ndarray, masks: int, seed: int = 0) -> torch.Tensor:
    """(masks, N, d): the feature the report decoder receives, for each film under `masks` patch masks."""
    cfg, L = model.cfg, model.encoder.num_patches
    x = model.prepare_images(torch.from_numpy(films)[:, None])[2]
    out = []
    for r in range(masks):
        noise = torch.rand(len(films), L, generator=torch.Generator().manual_seed(seed + r))
        ids_keep = random_masking(len(films), L, cfg.mask_ratio, None, None, noise)[0]
        pooled = torch.cat([global_pool(model.encoder(x[j:j + 256], ids_keep[j:j + 256])[:, 1:], cfg.fusion)
                            for j in range(0, len(films), 256)])
        out.append(model.fusion_proj(pooled) if model.fusion_proj is not None else pooled)
    return torch.stack(out)


@torch.no_grad()
def side_words(model: MRM, tok, n: int = 1500, repeats: int = 3) -> dict:
    """Accuracy on the masked side words per finding: {finding or 'all': {condition: accuracy}}."""
    cfg = model.cfg
    picked = []
    for i in range(FIRST, FIRST + n):
        sided = [k for k, f in synthetic.synth_case(i)["findings"].items() if "side" in f]
        if len(sided) == 1:
            picked.append((i, sided[0]))
    film = torch.from_numpy(checks.films_of([i for i, _ in picked], 2 * cfg.img_size))[:, None]
    t = torch.from_numpy(data.encode_reports(tok, [synthetic.synth_report(i) for i, _ in picked],
                                             cfg.max_text_len).astype(np.int64))
    is_side = torch.isin(t, torch.tensor([tok.token_to_id("right"), tok.token_to_id("left")]))
    labels, tokens = torch.where(is_side, t, -100), t.masked_fill(is_side, cfg.mask_token_id)
    row = torch.arange(len(t))[:, None].expand_as(t)[is_side]
    finding = np.array([picked[r][1] for r in row.tolist()])
    gen = torch.Generator().manual_seed(0)
    hits = {}
    for _ in range(repeats):
        patch_noise = torch.rand(len(film), model.encoder.num_patches, generator=gen)
        noise = torch.randint(0, 256, film.shape, generator=gen, dtype=torch.uint8)
        for condition, x in (("film", film), ("noise", noise), ("other_film", film.roll(1, 0))):
            hit = (model(x, tokens, labels, noise=patch_noise)["mlm_logits"].argmax(-1) == t[is_side]).numpy()
            for name in ["all", *sorted(set(finding))]:
                sel = hit if name == "all" else hit[finding == name]
                hits.setdefault(name, {}).setdefault(condition, []).append(sel.mean())
    return {name: {c: float(np.mean(v)) for c, v in by.items()} | {"words": int(len(hit) if name == "all" else
            (finding == name).sum())} for name, by in hits.items()}


def linear_read(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """x (N, d), y (N,) in {0, 1}: a logistic regression fitted on the first half, scored on the second.
    Returns (accuracy, d'), d' = 2 probit(accuracy): the distance between the two classes along the read,
    in standard deviations, for two equal Gaussians that give that accuracy."""
    return linear_read_split(x, y, len(x) // 2)


def linear_read_split(x: torch.Tensor, y: torch.Tensor, half: int) -> tuple[float, float]:
    mean, std = x[:half].mean(0), x[:half].std(0) + 1e-6
    z = (x - mean) / std
    w, b = softmax_regression(z[:half], y[:half], 2, 1e-2)
    accuracy = float(((z[half:] @ w + b).argmax(1) == y[half:]).float().mean())
    return accuracy, float(2 * torch.special.ndtri(torch.tensor(accuracy).clamp(1e-3, 1 - 1e-3)))


def feature_report(model: MRM, n: int = 600, masks: int = 6) -> dict:
    indices = range(FIRST + 5000, FIRST + 5000 + n)
    f = fused(model, checks.films_of(indices, 2 * model.cfg.img_size), masks if model.cfg.mask_ratio > 0 else 1)
    side = np.array([{"right": 0, "left": 1}.get(synthetic.synth_case(i)["findings"].get("pleural effusion", {})
                                                 .get("side"), -1) for i in indices])
    keep = torch.from_numpy(side >= 0)
    y, fe = torch.from_numpy(side[side >= 0]), f[:, keep]  # films with an effusion, each under every mask
    half = fe.shape[1] // 2  # films, not masks, split: the read is scored on films it was not fitted on
    x = torch.cat([fe[:, :half].flatten(0, 1), fe[:, half:].flatten(0, 1)])
    labels = torch.cat([y[:half].repeat(fe.shape[0]), y[half:].repeat(fe.shape[0])])
    accuracy, d = linear_read_split(x, labels, half * fe.shape[0])
    return {"norm": float(f.norm(dim=-1).mean()), "variance": float(f.flatten(0, 1).var(0).sum()),
            "variance_between_films": float(f.mean(0).var(0).sum()),
            "variance_from_the_mask": float(f.var(0).mean(0).sum()) if f.shape[0] > 1 else 0.0,
            "effusion_films": int(keep.sum()), "effusion_side_linear_read": accuracy, "effusion_side_d_prime": d}


# -----------------------------------------------------------------------------
# The toy side task, at a chosen strength

PAD, CLS, MASK, LEFT, FINDING, DIM = 0, 2, 3, 4, 10, 16


def toy_batch(n: int, rng, codes: np.ndarray, scale: float, noise: float):
    """[CLS] f1 s1 f2 s2 ... (1-3 findings of 8, side LEFT or LEFT + 1), half the real tokens masked; the
    feature is scale * the sum of codes[finding, side] plus N(0, noise^2) in each of its DIM dimensions."""
    tokens, feature = np.full((n, 8), PAD), rng.normal(0, noise, (n, DIM)).astype(np.float32)
    tokens[:, 0] = CLS
    for b in range(n):
        k = rng.integers(1, 4)
        pairs = list(zip(rng.choice(8, k, replace=False), rng.integers(0, 2, k)))
        tokens[b, 1:1 + 2 * k] = [t for f, s in pairs for t in (FINDING + f, LEFT + s)]
        feature[b] += scale * sum(codes[f, s] for f, s in pairs)
    tokens = torch.from_numpy(tokens)
    chosen = (tokens > CLS) & torch.from_numpy(rng.random(tokens.shape) < 0.5)
    return torch.where(chosen, MASK, tokens), torch.where(chosen, tokens, -100), torch.from_numpy(feature)


def toy_strength(codes: np.ndarray, scale: float, noise: float, n: int = 8000) -> tuple[float, float]:
    """linear_read of finding 0's side from the toy feature, measured as on the real one."""
    tokens, labels, feature = toy_batch(n, np.random.default_rng(5), codes, scale, noise)
    full = torch.where(labels != -100, labels, tokens)
    rows, at = torch.nonzero(full == FINDING, as_tuple=True)
    return linear_read(feature[rows], full[rows, at + 1] - LEFT)


def toy_read(scale: float, noise: float, steps: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    codes = np.random.default_rng(1).normal(size=(8, 2, DIM)).astype(np.float32)
    cfg = MRMConfig.from_preset("tiny", vocab_size=20, max_text_len=8)
    decoder, proj = ReportDecoder(cfg), torch.nn.Linear(DIM, cfg.text_embed_dim)
    init_weights(proj)
    opt = torch.optim.AdamW([*decoder.parameters(), *proj.parameters()], lr=1e-3, betas=(0.9, 0.95))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = recipes.lr_at(step, steps, 20, 1e-3)
        tokens, labels, feature = toy_batch(32, rng, codes, scale, noise)
        loss = F.cross_entropy(decoder(tokens, proj(feature)).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, labels, feature = toy_batch(2000, rng, codes, scale, noise)
    side = (labels == LEFT) | (labels == LEFT + 1)
    with torch.no_grad():
        return float((decoder.eval()(tokens, proj(feature)).argmax(-1)[side] == labels[side]).float().mean())


# -----------------------------------------------------------------------------
# The decoder alone, on a frozen encoder's cached features or on features of known content


def decoder_alone(ckpt: str, steps: int, every: int, n: int = 2048, masks: int = 8, standardise: bool = False):
    """The report decoder and fusion projection (a checkpoint's, or new ones) trained on a frozen encoder's
    cached pooled features (a random encoder's without a checkpoint)."""
    torch.manual_seed(0)
    reports = [synthetic.synth_report(i) for i in range(n)]
    model, tok = load(ckpt) if ckpt else new_model(reports)
    hr = 2 * model.cfg.img_size
    proj, model.fusion_proj = model.fusion_proj, None  # fused() then returns the pooled tokens
    pooled = fused(model, checks.films_of(range(n), hr), masks)  # (masks, n, D)
    films, held = checks.held_out(checks.CHECK_START, 300, hr)
    held_pooled = fused(model, films, 1, seed=999)[0]
    if standardise:
        mean, std = pooled.flatten(0, 1).mean(0), pooled.flatten(0, 1).std(0) + 1e-6
        pooled, held_pooled = (pooled - mean) / std, (held_pooled - mean) / std
    return train_reader(model.report_decoder, proj, tok, model.cfg, reports, pooled, held, held_pooled, steps, every)


def new_model(reports: list[str]) -> tuple[MRM, object]:
    """A tiny MRM with a tokenizer built from `reports`, as train.py builds them."""
    tok = train_tokenizer(reports)
    special = {k: tok.token_to_id(f"[{k.upper()}]") for k in ("pad", "mask")}
    return MRM(MRMConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), pad_token_id=special["pad"],
                                     mask_token_id=special["mask"])), tok


def oracle_features(indices, dim: int = 64) -> torch.Tensor:
    """(N, dim): for each record the sum of a fixed random code per finding present and per value of each
    of its attributes (side, size, zone): everything the image-only words need, plainly and linearly."""
    out = np.zeros((len(indices), dim), np.float32)
    for row, i in enumerate(indices):
        for name, f in synthetic.synth_case(i)["findings"].items():
            for key in [name, *(f"{name} {a} {f[a]}" for a in ("side", "size", "zone") if a in f)]:
                out[row] += np.random.default_rng([1, *key.encode()]).normal(size=dim)  # a code per key, in any call
    return torch.from_numpy(out)


def pixel_features(films: np.ndarray, mask_ratio: float, masks: int, patch: int, seed: int) -> torch.Tensor:
    """(masks, N, 4 L): the visible pixels of each masked film, as the 2 x 2 means of each of its L patches
    (0 where a patch is masked), standardised: what a linear map of the masked film itself can give."""
    x = torch.from_numpy(films).float()[:, None] / 255
    cells = F.avg_pool2d(x, patch // 2)[:, 0]  # (N, 2G, 2G)
    cells = (cells - cells.mean(0)) / (cells.std(0) + 1e-3)
    N, G = len(films), cells.shape[-1] // 2
    out = []
    for r in range(masks):
        noise = torch.rand(N, G * G, generator=torch.Generator().manual_seed(seed + r))
        keep = 1 - random_masking(N, G * G, mask_ratio, None, None, noise)[1]  # (N, L), 1 = visible
        keep = keep.view(N, G, G).repeat_interleave(2, 1).repeat_interleave(2, 2)
        out.append((cells * keep).flatten(1))
    return torch.stack(out)


def reader(feature: str, mask_ratio: float, steps: int, every: int, n: int = 2048, masks: int = 10):
    """A new tiny report decoder and projection trained on `feature` features of the training records
    (oracle_features, or pixel_features at mask_ratio under `masks` masks, the demo's 10 epochs' worth),
    scored on the fusion check's held-out records."""
    torch.manual_seed(0)
    reports = [synthetic.synth_report(i) for i in range(n)]
    model, tok = new_model(reports)
    held_ids = range(checks.CHECK_START, checks.CHECK_START + 300)
    held = [synthetic.synth_report(i) for i in held_ids]
    if feature == "oracle":
        train_f, held_f = oracle_features(range(n))[None], oracle_features(held_ids)
    else:
        hr, p = 2 * model.cfg.img_size, 2 * model.cfg.patch_size  # high-res patches, as the image decoder's
        both = pixel_features(np.concatenate([checks.films_of(range(n), hr), checks.films_of(held_ids, hr)]),
                              mask_ratio, masks, p, 0)
        train_f, held_f = both[:, :n], both[0, n:]
    proj = torch.nn.Linear(train_f.shape[-1], model.cfg.text_embed_dim)
    init_weights(proj)
    return train_reader(model.report_decoder, proj, tok, model.cfg, reports, train_f, held, held_f, steps, every)


def train_reader(dec, proj, tok, cfg, reports, features, held, held_features, steps: int, every: int) -> list:
    """Train dec + proj with Eq. 1 alone (the demo's lr, warm-up and schedule, batch 32) on reports[i] with
    features[random mask, i] (masks, N, D); every `every` steps score the fusion check's image-only words
    and side words of `held` from their own held_features and from another report's."""
    n = len(reports)
    params = [*dec.parameters(), *proj.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            betas=(0.9, 0.95))
    lr = 1.5e-2 * 32 / 256  # the demo's
    reports_t, held_t = (data.encode_reports(tok, r, cfg.max_text_len) for r in (reports, held))
    group_ids = checks.group_token_ids(tok)
    rng = np.random.default_rng(0)

    def masked(rows, r):
        m = [data.mask_report(t, 0.5, r, cfg.mask_token_id, cfg.pad_token_id) for t in rows]
        return (torch.from_numpy(np.stack([x[0] for x in m]).astype(np.int64)),
                torch.from_numpy(np.stack([x[1] for x in m]).astype(np.int64)))

    @torch.no_grad()
    def score():
        dec.eval()
        r, right, count = np.random.default_rng([0, 7]), {}, {"image_only": 0, "side": 0}
        for _ in range(4):
            t, lab = masked(held_t, r)
            target, sel = checks.word_groups(t, lab, group_ids)
            for g in count:
                count[g] += int(sel[g].sum())
            for condition, f in (("film", held_features), ("other_film", held_features.roll(1, 0))):
                hit = dec(t, proj(f)).argmax(-1)[lab != -100] == target
                for g in count:
                    key = condition if g == "image_only" else f"{g}_{condition}"
                    right[key] = right.get(key, 0) + int(hit[sel[g]].sum())
        dec.train()
        return {k: v / max(1, count["image_only" if k in ("film", "other_film") else "side"]) for k, v in right.items()}

    dec.train()
    start, rows = time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = recipes.lr_at(step, steps, n // 32, lr)
        pick = rng.integers(0, n, 32)
        t, lab = masked(reports_t[pick], rng)
        f = features[rng.integers(0, len(features), 32), pick]
        loss = F.cross_entropy(dec(t, proj(f)).flatten(0, 1), lab.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % every == 0:
            rows.append({"step": step + 1, "loss": loss.item(), **score()})
            r = rows[-1]
            print(f"step {step + 1}: image-only words {r['film']:.3f} from the film, {r['other_film']:.3f} from "
                  f"another's; side words {r['side_film']:.3f} / {r['side_other_film']:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["side", "feature", "sweep", "decoder", "reader"])
    parser.add_argument("checkpoint", nargs="?", default="", help="a train.py ckpt.pt (decoder: optional)")
    parser.add_argument("--steps", type=int, help="decoder, reader: optimizer steps (6,000; reader: the demo's 640)")
    parser.add_argument("--every", type=int, help="decoder, reader: steps between scores (1,000; reader: 160)")
    parser.add_argument("--standardise", action="store_true", help="decoder: standardise the cached features")
    parser.add_argument("--feature", choices=["oracle", "pixels"], default="pixels", help="reader: what it is given")
    parser.add_argument("--mask_ratio", type=float, default=0.75, help="reader --feature pixels: patches removed")
    args = parser.parse_args(argv)
    if args.what in ("side", "feature") and not args.checkpoint:
        parser.error(f"{args.what} needs a checkpoint")
    if args.what == "side":
        for name, r in side_words(*load(args.checkpoint)).items():
            print(f"{name:17s} {r['words']:5d} words: film {r['film']:.3f}, noise {r['noise']:.3f}, "
                  f"other film {r['other_film']:.3f}")
    elif args.what == "feature":
        for k, v in feature_report(load(args.checkpoint)[0]).items():
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    elif args.what == "sweep":
        codes = np.random.default_rng(1).normal(size=(8, 2, DIM)).astype(np.float32)
        print("| linear read of the side (d') | decoder after 300 steps | after 1,000 steps |\n| --- | --- | --- |")
        for scale, noise in ((1.0, 0.0), (0.3, 1.0), (0.1, 1.0), (0.05, 1.0), (0.02, 1.0)):
            accuracy, d = toy_strength(codes, scale, noise)
            print(f"| {accuracy:.3f} ({d:.2f}) | {toy_read(scale, noise, 300):.3f} | "
                  f"{toy_read(scale, noise, 1000):.3f} |", flush=True)
    elif args.what == "decoder":
        decoder_alone(args.checkpoint, args.steps or 6000, args.every or 1000, standardise=args.standardise)
    else:
        reader(args.feature, args.mask_ratio, args.steps or 640, args.every or 160)


if __name__ == "__main__":
    main()
