"""What pre-training learnt, on held-out synthetic records: the fusion check (does the report decoder read the film?)
and the reconstruction of train.py's recon.png (Fig. 3). How a fine-tuned encoder is scored is metrics.py's.

MRM's one idea (Sec. 3.1) is that a report's masked words are restored from the visible words *and* a global feature
of the radiograph, so that the encoder must learn what radiologists write about. The fusion check restores the masked
words of held-out reports, with the same text and image masks, from each report's own radiograph (film), from uniform
noise in its place (noise) and from another report's radiograph (other_film), and compares the accuracy per group of
WORD_GROUPS: side, size and zone, which the synthetic film decides and the phrasing never does (synthetic.write_report);
presence (no and the findings' names); other (every other word: phrasing the text alone can tell); all. "image_only"
pools the masked attribute words (side, size, zone) that no visible word of the same report repeats: only the film (or
a guess) can tell them; "with_twin" pools the others, whose word is still in sight elsewhere in the report and can be
copied. A decoder that ignores the film scores film = noise = other_film; one that reads it scores film above both on
image_only. other_film is the stricter control: noise is unlike any film, so a decoder could score film > noise only
because noise throws it off; another real film throws it off only if it reads what that film shows.

The pooled spread says how much the fusion's input (the mean of the encoder's patch tokens) differs between
radiographs: the norm of its per-dimension std over films over the norm of its mean. A random encoder gives about 0.2;
near 0, every film gives the same feature and nothing can be read from it."""
import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
from machinery import synthetic
from mrm import MRM, patchify, unpatchify

CHECK_START = 2_000_000  # held-out synthetic records: pre-training (0..) and fine-tuning (1,000,000..) never see them
WORD_GROUPS = {"side": ("right", "left"), "size": ("mild", "moderate", "small", "large"),
               "zone": ("upper", "mid", "lower", "base"),
               "presence": ("no", "atelectasis", "cardiomegaly", "consolidation", "effusion", "pneumothorax", "nodule")}
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
    ids = range(first, first + n)
    return films_of(ids, hr, seed), [synthetic.synth_report(i, seed) for i in ids]


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
def fusion_check(model, tok, films: np.ndarray, reports: list[str], text_mask_ratio: float = 0.5,
                 masks_per_report: int = 4, seed: int = 0, batch: int = 100) -> dict:
    """Restore the masked words of `reports` from their `films` (N, 2H, 2W) uint8 and from noise, each report masked
    as pre-training masks it (text_mask_ratio, Sec. 3.1). Returns {group: {'film', 'noise', 'other_film': accuracy,
    'count': masked words scored}} for GROUPS. 'other_film' gives each report the film of the report before it (the
    first, the last one's), whatever the batches."""
    cfg, device = model.cfg, next(model.parameters()).device
    was_training = model.training
    model.eval()
    group_ids = group_token_ids(tok)
    tokens = data.encode_reports(tok, reports, cfg.max_text_len)
    L = (cfg.img_size // cfg.patch_size) ** 2
    rng, gen = np.random.default_rng([seed, 7]), torch.Generator().manual_seed(seed)
    right = {c: dict.fromkeys(GROUPS, 0) for c in CONDITIONS}
    count = dict.fromkeys(GROUPS, 0)
    # another held-out record's film for each: real, but not its report's (a decoder that reads the film is misled
    # by it; one that only tells real films from noise is not)
    others = np.roll(films, 1, axis=0)
    for _ in range(masks_per_report):
        for start in range(0, len(reports), batch):
            rows = slice(start, start + batch)
            masked = [data.mask_report(t, text_mask_ratio, rng, cfg.mask_token_id, cfg.pad_token_id)
                      for t in tokens[rows]]
            t = torch.from_numpy(np.stack([m[0] for m in masked]).astype(np.int64))  # (B, T)
            labels = torch.from_numpy(np.stack([m[1] for m in masked]).astype(np.int64))
            film, other = torch.from_numpy(films[rows])[:, None], torch.from_numpy(others[rows])[:, None]
            noise = torch.randint(0, 256, film.shape, generator=gen, dtype=torch.uint8)
            patch_noise = torch.rand(len(film), L, generator=gen)  # one image mask for every condition
            target, sel = word_groups(t, labels, group_ids)
            for g, s in sel.items():
                count[g] += int(s.sum())
            for condition, x in (("film", film), ("noise", noise), ("other_film", other)):
                out = model(x.to(device), t.to(device), labels.to(device), noise=patch_noise.to(device))
                hit = out["mlm_logits"].argmax(-1).cpu() == target
                for g, s in sel.items():
                    right[condition][g] += int(hit[s].sum())
    model.train(was_training)
    return {g: {**{c: right[c][g] / max(1, count[g]) for c in CONDITIONS}, "count": count[g]} for g in GROUPS}


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


def pooled_spread(encoder, prepare_images, films: np.ndarray) -> float:
    """Spread of the mean post-norm patch token of whole films between films (see the module's text)."""
    pooled = pooled_features(encoder, prepare_images, films)  # (N, D)
    return float(pooled.std(0).norm() / pooled.mean(0).norm())


@functools.lru_cache(maxsize=1)
def held_out_records(n: int, hr: int, seed: int):
    """The fusion check's films and reports, rendered once a run however often it checks."""
    return held_out(CHECK_START, n, hr, seed)


def held_out_check(model: MRM, tok, n: int, seed: int, epoch: int, step: int, text_mask_ratio: float) -> dict:
    """train.py's check of MRM's idea on n held-out records, printed and returned for its log: are masked words restored
    better from their own film than from noise, and does the pooled image feature still differ between films?"""
    films, reports = held_out_records(n, 2 * model.cfg.img_size, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_encoder = MRM(model.cfg).encoder.to(next(model.parameters()).device)  # as the run began
    result = {"records": n, "epoch": epoch, "step": step,
              "pooled_spread": {"trained": pooled_spread(model.encoder, model.prepare_images, films),
                                "random": pooled_spread(random_encoder, model.prepare_images, films)}}
    if model.report_decoder is not None:
        result.update(fusion_check(model, tok, films, reports, text_mask_ratio, seed=seed))
        print(f"epoch {epoch}: " + summary(result))
    spread = result["pooled_spread"]
    print(f"pooled image feature spread between films: {spread['trained']:.3f} "
          f"(a random encoder: {spread['random']:.3f})")
    return result


def summary(check: dict) -> str:
    """One sentence for a person."""
    io = check["image_only"]
    groups = ", ".join(f"{g} {check[g]['film']:.2f} / {check[g]['noise']:.2f}" for g in ("side", "size", "presence"))
    return (f"fusion check: of {io['count']} masked words that only the film can tell, {io['film']:.1%} were restored "
            f"from the film, {io['noise']:.1%} from noise in its place and {io['other_film']:.1%} from another "
            f"report's film ({groups}, film / noise)")


# -----------------------------------------------------------------------------
# The reconstruction (Fig. 3), which train.py draws as recon.png (machinery/pictures.py)


@torch.no_grad()
def reconstruct(model: MRM, dataset: data.PretrainDataset, n: int = 4) -> dict:
    """Run the model on the first n records, whole images, fixed masks. Returns images (B, 1, 2H, 2W) in [0, 1]:
    'masked' input, 'restored' (restored patches + visible ones, if there is an image decoder), 'original'; and token
    rows: 'tokens' (masked report), 'restored_ids', 'right' (bool), 'labels'."""
    cfg, device = model.cfg, next(model.parameters()).device
    hr, p = 2 * cfg.img_size, cfg.patch_size
    rng = np.random.default_rng(0)  # the same records and masks every time: pictures compare across epochs
    imgs, toks, labels = [], [], []
    for i in range(min(n, len(dataset))):
        img, j, _ = dataset.load(i)
        imgs.append(data.full_view(img, hr))
        t, l = data.mask_report(dataset.tokens[j], dataset.text_mask_ratio, rng, dataset.mask_id, dataset.pad_id)
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
    # where the picture shows a prediction: the removed patches (every patch when none is, as the loss then scores all)
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
