"""Checks of mrm.py: shapes, hand-computed values, masking, losses, fusion and the ViT itself. The quick checks
for a learner who edits mrm.py leave out the three marked slow (base size, a tiny model trained for 50 steps):
python -m pytest -q tests/test_mrm.py -m "not slow"."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from machinery.checkpoints import check_model_config
from mrm import (MRM, MRMConfig, ReportDecoder, ViT, drop_path, get_2d_sincos_pos_embed, global_pool, mim_loss,
                 mlm_loss, patchify, random_masking, unpatchify)

VOCAB, T = 64, 24


def tiny_cfg(**kw):
    return MRMConfig.from_preset("tiny", vocab_size=VOCAB, max_text_len=T, **kw)


def make_batch(cfg, B=2, seed=0):
    """High-res images in [0, 1] and a report per record: [CLS], words, some [MASK], [PAD] at the end."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 3, 2 * cfg.img_size, 2 * cfg.img_size, generator=g)
    words = torch.randint(4, cfg.vocab_size, (B, T), generator=g)
    masked = torch.rand(B, T, generator=g) < 0.5
    masked[:, 0] = False  # [CLS]
    masked[:, 1] = True  # at least one
    tokens = torch.where(masked, torch.full_like(words, cfg.mask_token_id), words)
    tokens[:, 0] = 2
    labels = torch.where(masked, words, torch.full_like(words, -100))
    tokens[-1, T - 5:], labels[-1, T - 5:] = cfg.pad_token_id, -100  # the last report is shorter
    return images, tokens, labels


def run(model, batch, seed=0, **kw):
    return model(*batch, generator=torch.Generator().manual_seed(seed), **kw)


# ----------------------------------------------------------------------------- patches and positions

def test_patchify_layout_by_hand():
    # 2 channels, 4x4, p = 2: a patch lists pixel (0,0) ch0, (0,0) ch1, (0,1) ch0, (0,1) ch1, (1,0) ch0, ...
    img = torch.arange(32.0).reshape(1, 2, 4, 4)  # channel 1 = channel 0 + 16
    x = patchify(img, 2)
    assert x.shape == (1, 4, 8)
    assert x[0, 0].tolist() == [0, 16, 1, 17, 4, 20, 5, 21]
    assert x[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]  # second patch of the first row
    assert x[0, 2].tolist() == [8, 24, 9, 25, 12, 28, 13, 29]  # first patch of the second row


def test_patchify_round_trip():
    imgs = torch.randn(3, 3, 64, 64)
    for p in (8, 16, 32):
        assert torch.equal(unpatchify(patchify(imgs, p), p, 3), imgs)


def test_sincos_by_hand():
    # D = 8: each axis gets 4 channels, sin/cos at frequencies 1 and 1/100 (10000^(-1/2)).
    t = get_2d_sincos_pos_embed(8, 2, cls_token=True)
    assert t.shape == (5, 8) and t.dtype.name == "float32"
    s1, s2, c1, c2 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    expected = [
        [0] * 8,  # [CLS]
        [0, 0, 1, 1, 0, 0, 1, 1],  # row 0, col 0
        [s1, s2, c1, c2, 0, 0, 1, 1],  # row 0, col 1: the column code comes first
        [0, 0, 1, 1, s1, s2, c1, c2],  # row 1, col 0
        [s1, s2, c1, c2, s1, s2, c1, c2],  # row 1, col 1
    ]
    assert torch.allclose(torch.from_numpy(t), torch.tensor(expected), atol=1e-7)


def test_sincos_equals_mae_formula_at_base_size():
    D, G = 768, 14
    t = torch.from_numpy(get_2d_sincos_pos_embed(D, G, cls_token=True))
    assert t.shape == (197, 768) and not t[0].any()
    quarter = D // 4
    for i in (1, 15, 100, 196):  # a few patches, every channel, straight from the formula
        r, c = divmod(i - 1, G)
        for j in range(D):
            half, k = divmod(j, D // 2)  # half 0: column, half 1: row
            pos = c if half == 0 else r
            kind, f = divmod(k, quarter)  # kind 0: sin, 1: cos
            omega = 1.0 / 10000 ** (f / quarter)
            want = math.sin(pos * omega) if kind == 0 else math.cos(pos * omega)
            assert abs(t[i, j].item() - want) < 1e-6, (i, j)


# ----------------------------------------------------------------------------- masking

@pytest.mark.parametrize("L,ratio", [(196, 0.75), (196, 0.5), (64, 0.75), (49, 0.6), (196, 0.0)])
def test_masking_counts_and_restore(L, ratio):
    keep = int(L * (1 - ratio))
    ids_keep, mask, ids_restore = random_masking(5, L, ratio, generator=torch.Generator().manual_seed(1))
    assert ids_keep.shape == (5, keep) and mask.shape == (5, L) and ids_restore.shape == (5, L)
    assert (mask.sum(1) == L - keep).all()
    assert (torch.gather(mask, 1, ids_keep) == 0).all()  # kept patches are marked visible
    # the decoder's contract: [kept tokens, then mask tokens] gathered with ids_restore lands each kept
    # token on its own patch position and a mask token on every removed one
    shuffled = torch.cat([ids_keep, torch.full((5, L - keep), -1)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore)
    assert torch.equal(restored, torch.where(mask.bool(), -1, torch.arange(L)))


def test_masking_generator_and_per_sample():
    a = random_masking(4, 196, 0.75, generator=torch.Generator().manual_seed(3))[1]
    b = random_masking(4, 196, 0.75, generator=torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # each sample has its own mask


def test_masking_from_given_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ids_keep, mask, ids_restore = random_masking(1, 4, 0.5, noise=noise)
    assert ids_keep.tolist() == [[1, 3]] and mask.tolist() == [[1, 0, 1, 0]]
    with pytest.raises(ValueError, match=r"mask noise must be \(2, 4\), got \(1, 4\)"):
        random_masking(2, 4, 0.5, noise=noise)
    cfg = tiny_cfg()
    images, tokens, labels = make_batch(cfg)
    noise = torch.rand(2, (cfg.img_size // cfg.patch_size) ** 2)
    out = MRM(cfg)(images, tokens, labels, noise=noise)
    assert torch.equal(out["mask"], random_masking(2, noise.shape[1], cfg.mask_ratio, noise=noise)[1])


# ----------------------------------------------------------------------------- losses

def test_mim_loss_by_hand_and_only_masked():
    pred = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0] * 4, [0.5] * 4]])
    mask = torch.tensor([[0.0, 1.0]])  # patch 0 visible, patch 1 removed
    assert mim_loss(pred, target, mask).item() == pytest.approx(0.25)
    changed_visible = target.clone()
    changed_visible[0, 0] = 7.0
    assert mim_loss(pred, changed_visible, mask).item() == pytest.approx(0.25)
    changed_masked = target.clone()
    changed_masked[0, 1] = 1.0
    assert mim_loss(pred, changed_masked, mask).item() == pytest.approx(1.0)


def test_mim_loss_norm_pix_by_hand():
    target = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]])  # mean 0.5, unbiased variance 1/3
    loss = mim_loss(torch.zeros(1, 1, 4), target, torch.ones(1, 1), norm_pix_loss=True)
    assert loss.item() == pytest.approx(0.25 / (1 / 3 + 1e-6), rel=1e-5)


def test_mim_loss_norm_pix_eps_is_inside_the_root():
    # a nearly flat patch shows where eps sits: variance 1e-6/3, so eps matters as much as the variance
    target = torch.tensor([[[0.0, 1e-3, 0.0, 1e-3]]])
    loss = mim_loss(torch.zeros(1, 1, 4), target, torch.ones(1, 1), norm_pix_loss=True)
    assert loss.item() == pytest.approx(5e-4**2 / (1e-6 / 3 + 1e-6), rel=1e-4)


def test_mlm_loss_by_hand():
    assert mlm_loss(torch.zeros(1, 4), torch.tensor([2])).item() == pytest.approx(math.log(4))
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    want = (-math.log(math.e**2 / (math.e**2 + 1)) + math.log(2)) / 2
    assert mlm_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(want, rel=1e-6)


def test_mlm_loss_with_a_shared_denominator():
    """train.py divides each micro-batch's summed cross entropy by the mean count over the whole step."""
    logits, targets = torch.zeros(3, 4), torch.tensor([0, 1, 2])
    assert mlm_loss(logits, targets, denominator=6).item() == pytest.approx(3 * math.log(4) / 6)
    assert mlm_loss(logits[:0], targets[:0], denominator=6).item() == 0  # a micro-batch may have none
    # two halves, each divided by the mean count 1.5, average to the mean over all three tokens
    halves = (mlm_loss(logits[:1], targets[:1], 1.5) + mlm_loss(logits[1:], targets[1:], 1.5)) / 2
    assert halves.item() == pytest.approx(mlm_loss(logits, targets).item())


# ----------------------------------------------------------------------------- the model

def test_forward_shapes_tiny():
    cfg = tiny_cfg()
    out = run(MRM(cfg), make_batch(cfg))
    L = (cfg.img_size // cfg.patch_size) ** 2
    assert out["pred"].shape == (2, L, (2 * cfg.patch_size) ** 2 * 3)
    assert out["mask"].shape == (2, L) and out["mask"].sum().item() == 2 * (L - int(L * 0.25))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_model_losses_match_the_pure_functions():
    cfg = tiny_cfg()
    model = MRM(cfg)
    images, tokens, labels = batch = make_batch(cfg)
    out = run(model, batch)
    target = patchify(images, 2 * cfg.patch_size)  # 16 x 16 high-res patches on the 8 x 8 grid
    assert torch.allclose(out["loss_mim"], mim_loss(out["pred"], target, out["mask"]))
    # report loss: cross entropy at the masked positions only, from the full (B, T, V) logits
    ids_keep = random_masking(2, 64, cfg.mask_ratio, generator=torch.Generator().manual_seed(0))[0]  # as run()
    latent = model.encoder(model.prepare_images(images)[2], ids_keep)
    feature = model.fusion_proj(latent[:, 1:].mean(1))
    full = model.report_decoder(tokens, feature)  # (B, T, V)
    want = F.cross_entropy(full.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out["loss_mlm"], want, atol=1e-5)
    assert torch.allclose(out["mlm_logits"], full[labels != -100], atol=1e-5)  # masked-only head = full head
    everywhere = F.cross_entropy(full.reshape(-1, VOCAB), torch.where(labels == -100, tokens, labels).reshape(-1))
    assert not torch.allclose(out["loss_mlm"], everywhere)  # unmasked positions really are left out


def test_fast_mlm_head_gives_the_plain_loss_and_gradient():
    """Speed does not change results: the head at host-counted flat positions (mlm_index, what train.py
    passes: no device sync), at the positions found inside the model, and the full (B, T, V) head scored
    with ignore_index give one loss and one gradient."""
    cfg = tiny_cfg()
    images, tokens, labels = make_batch(cfg, B=3)
    index = torch.nonzero(labels.flatten() != -100).squeeze(1)
    denominator = torch.tensor(11.0)  # as train.py passes it
    weights, results = MRM(cfg).state_dict(), []
    for path in ("index", "found", "full"):
        model = MRM(cfg)
        model.load_state_dict(weights)
        out = run(model, (images, tokens, labels), mlm_denominator=denominator,
                  mlm_index=index if path == "index" else None)
        loss = out["loss"]
        if path == "full":  # swap the masked-only report loss for the full head's
            ids_keep = random_masking(3, 64, cfg.mask_ratio, generator=torch.Generator().manual_seed(0))[0]
            feature = model.fusion_proj(model.encoder(model.prepare_images(images)[2], ids_keep)[:, 1:].mean(1))
            logits = model.report_decoder(tokens, feature)  # (B, T, V)
            full = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            loss = loss - out["loss_mlm"] + full / denominator
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1), (l2, g2) = results
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert torch.allclose(l0, l2, atol=1e-5) and torch.allclose(g0, g2, atol=1e-5)
    assert g0.abs().sum() > 0
    # ReportDecoder picks the same rows from a bool mask and from flat positions
    dec, feature = MRM(cfg).report_decoder, torch.randn(3, cfg.text_embed_dim)
    assert torch.equal(dec(tokens, feature, predict_at=labels != -100), dec(tokens, feature, predict_at=index))


def test_lambda_weighting():
    cfg = tiny_cfg()
    batch = make_batch(cfg)
    base = MRM(cfg)
    outs = {}
    for lam in (0.5, 1.0, 2.0):
        m = MRM(tiny_cfg(mim_weight=lam))
        m.load_state_dict(base.state_dict())
        outs[lam] = run(m, batch)
        assert torch.allclose(outs[lam]["loss"], outs[lam]["loss_mlm"] + lam * outs[lam]["loss_mim"])
    assert torch.allclose(outs[0.5]["loss_mim"], outs[2.0]["loss_mim"])
    assert torch.allclose(outs[0.5]["loss_mlm"], outs[2.0]["loss_mlm"])
    assert not torch.allclose(outs[0.5]["loss"], outs[2.0]["loss"])


def test_ablations_build_only_what_they_train():
    cfg = tiny_cfg(mlm_weight=0)
    m = MRM(cfg)
    assert m.report_decoder is None and m.fusion_proj is None
    out = run(m, make_batch(cfg))
    assert out["loss_mlm"].item() == 0 and torch.equal(out["loss"], out["loss_mim"])

    cfg = tiny_cfg(mim_weight=0)
    m = MRM(cfg)
    assert m.image_decoder is None
    out = run(m, make_batch(cfg))
    assert "pred" not in out and torch.equal(out["loss"], out["loss_mlm"])
    out["loss"].backward()  # the report loss alone trains the encoder, through the fused image feature
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    # refused in one line by the scripts (a ValueError), and asserted by the model itself
    with pytest.raises(ValueError, match="nothing to learn"):
        check_model_config(tiny_cfg(mlm_weight=0, mim_weight=0))
    with pytest.raises(AssertionError, match="nothing to learn"):
        MRM(tiny_cfg(mlm_weight=0, mim_weight=0))


def test_inputs_that_would_give_nan_are_refused():
    with pytest.raises(ValueError, match="mask_ratio"):
        check_model_config(tiny_cfg(mask_ratio=1.0))  # no visible patch: nothing to pool, nothing to encode
    with pytest.raises(AssertionError, match="mask_ratio"):
        MRM(tiny_cfg(mask_ratio=1.0))
    cfg = tiny_cfg()
    images, tokens, labels = make_batch(cfg)
    with pytest.raises(ValueError, match="no masked report token"):
        run(MRM(cfg), (images, tokens, torch.full_like(labels, -100)))


def test_image_decoder_puts_each_token_on_its_patch():
    # with no decoder block every position is predicted from its own token alone, so the un-shuffle
    # is visible: a kept patch from its latent, a removed one from the mask token, each + its position
    cfg = tiny_cfg(decoder_depth=0)
    dec = MRM(cfg).image_decoder
    with torch.no_grad():
        dec.mask_token.normal_()
    B, L, K = 2, 64, 16
    ids_keep, mask, ids_restore = random_masking(B, L, 0.75, generator=torch.Generator().manual_seed(4))
    latent = torch.randn(B, 1 + K, cfg.embed_dim)
    pred = dec(latent, ids_restore)
    head = lambda t: dec.decoder_pred(dec.decoder_norm(t))  # noqa: E731
    pos = dec.decoder_pos_embed[0]
    for b in range(B):
        for j in range(K):
            p = ids_keep[b, j]
            assert torch.allclose(pred[b, p], head(dec.decoder_embed(latent[b, 1 + j]) + pos[1 + p]), atol=1e-5)
        for p in torch.nonzero(mask[b]).flatten():
            assert torch.allclose(pred[b, p], head(dec.mask_token[0, 0] + pos[1 + p]), atol=1e-5)


def test_every_trainable_parameter_gets_a_gradient():
    # DDP without find_unused_parameters needs this for the default model and each switch
    for kw in ({}, {"fusion": "gmp"}, {"super_resolution": False}, {"multimodal_mim": True}, {"mlm_weight": 0}):
        cfg = tiny_cfg(**kw)
        m = MRM(cfg)
        run(m, make_batch(cfg))["loss"].backward()
        unused = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, (kw, unused)


def test_gap_and_gmp():
    x = torch.randn(2, 5, 8)
    assert torch.equal(global_pool(x, "gap"), x.mean(1))
    assert torch.equal(global_pool(x, "gmp"), x.max(1).values)
    with pytest.raises(ValueError):
        global_pool(x, "cls")
    gap, gmp = MRM(tiny_cfg()), MRM(tiny_cfg(fusion="gmp"))
    gmp.load_state_dict(gap.state_dict())
    batch = make_batch(tiny_cfg())
    a, b = run(gap, batch), run(gmp, batch)
    assert torch.allclose(a["loss_mim"], b["loss_mim"])  # same image path
    assert not torch.allclose(a["loss_mlm"], b["loss_mlm"])  # different fused feature


def test_fusion_only_reaches_visible_real_tokens():
    cfg = tiny_cfg()
    dec = ReportDecoder(cfg).eval()
    tokens = torch.tensor([[2, 10, 3, 11, 0, 0]])
    assert dec.hybrid_positions(tokens).tolist() == [[True, True, False, True, False, False]]
    f1, f2 = torch.randn(1, cfg.text_embed_dim), torch.randn(1, cfg.text_embed_dim)
    assert not torch.allclose(dec(tokens, f1), dec(tokens, f2))
    # a report of only [MASK] and [PAD] has no hybrid token: the image feature cannot enter
    only_masks = torch.tensor([[3, 3, 3, 0]])
    assert torch.allclose(dec(only_masks, f1), dec(only_masks, f2))


def test_fusion_at_all_tokens_reaches_the_masked_ones_directly():
    """fusion_tokens='all' (the released code): [MASK] tokens get the image feature too, [PAD] still not.
    With no decoder block, a [MASK] position's output then depends on the image feature only this way."""
    tokens = torch.tensor([[2, 10, 3, 11, 0, 0]])
    f1, f2 = torch.randn(1, 128), torch.randn(1, 128)
    for where, reaches in (("visible", False), ("all", True)):
        dec = ReportDecoder(tiny_cfg(fusion_tokens=where, text_depth=0)).eval()
        expected = [True, True, reaches, True, False, False]
        assert dec.hybrid_positions(tokens).tolist() == [expected]
        assert dec.visible(tokens).tolist() == [[True, True, False, True, False, False]]
        at_mask = dec(tokens, f1)[0, 2], dec(tokens, f2)[0, 2]
        assert torch.allclose(*at_mask) != reaches
    with pytest.raises(ValueError, match="fusion_tokens"):
        check_model_config(tiny_cfg(fusion_tokens="masked"))
    with pytest.raises(AssertionError, match="fusion_tokens"):
        MRM(tiny_cfg(fusion_tokens="masked"))


def test_report_decoder_knows_word_order():
    cfg = tiny_cfg()
    dec = ReportDecoder(cfg).eval()
    feature = torch.randn(1, cfg.text_embed_dim)
    a = dec(torch.tensor([[2, 10, 11, 3]]), feature)[0, 3]
    b = dec(torch.tensor([[2, 11, 10, 3]]), feature)[0, 3]  # same words, swapped: the learned positions tell
    assert not torch.allclose(a, b, atol=1e-4)


def test_words_are_not_drowned_by_the_image_feature():
    """At init the image feature (a projection of post-norm encoder features) is far larger than a
    normal(0, 0.02) embedding; the embedding LayerNorm keeps two different words apart after it is added."""
    cfg = tiny_cfg()
    model = MRM(cfg)
    images, tokens, labels = make_batch(cfg)
    _, _, x = model.prepare_images(images)
    feature = model.fusion_proj(global_pool(model.encoder(x)[:, 1:]))[:1]  # (1, d), as in forward
    dec = model.report_decoder
    words = torch.tensor([[2, 10], [2, 11]])
    hybrid = dec.embed(words) + feature.unsqueeze(1)
    assert F.cosine_similarity(hybrid[0, 1], hybrid[1, 1], dim=0) < 0.9


def test_report_padding_is_invisible():
    cfg = tiny_cfg()
    dec = ReportDecoder(cfg).eval()
    feature = torch.randn(1, cfg.text_embed_dim)
    short = torch.tensor([[2, 10, 3, 11, 12]])
    padded = torch.cat([short, torch.zeros(1, 7, dtype=torch.long)], 1)
    assert torch.allclose(dec(short, feature), dec(padded, feature)[:, :5], atol=1e-5)


def test_super_resolution_off_predicts_low_res_patches():
    cfg = tiny_cfg(super_resolution=False)
    images, tokens, labels = batch = make_batch(cfg)
    m = MRM(cfg)
    out = run(m, batch)
    assert out["pred"].shape == (2, 64, cfg.patch_size**2 * 3)  # 8 x 8 x 3 = 192
    low = F.interpolate(images, scale_factor=0.5, mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.allclose(out["loss_mim"], mim_loss(out["pred"], patchify(low, cfg.patch_size), out["mask"]))


def test_mask_ratio_zero_scores_every_patch():
    cfg = tiny_cfg(mask_ratio=0.0)
    images, _, _ = batch = make_batch(cfg)
    out = run(MRM(cfg), batch)
    assert out["mask"].sum() == 0
    target = patchify(images, 2 * cfg.patch_size)
    assert torch.allclose(out["loss_mim"], ((out["pred"] - target) ** 2).mean())


def test_multimodal_image_restoration_uses_the_report():
    cfg = tiny_cfg(multimodal_mim=True)
    m = MRM(cfg)
    images, tokens, labels = batch = make_batch(cfg)
    other, words = tokens.clone(), tokens > 3
    other[words] = 4 + (tokens[words] - 3) % (VOCAB - 4)  # every visible word replaced by another word
    a, b = run(m, batch), run(m, (images, other, labels))
    assert not torch.allclose(a["pred"], b["pred"])
    plain = MRM(tiny_cfg())
    a, b = run(plain, batch), run(plain, (images, other, labels))
    assert torch.allclose(a["pred"], b["pred"])  # the paper's default decoder ignores the report


@torch.no_grad()
def test_multimodal_feature_ignores_mask_and_pad_tokens():
    cfg = tiny_cfg(multimodal_mim=True)
    m = MRM(cfg).eval()
    images = torch.rand(1, 3, 128, 128)
    short = torch.tensor([[2, 10, 11, 3] + [0] * (T - 4)])
    more_masks = short.clone()
    more_masks[0, 4:8] = 3  # [PAD] turned into [MASK]: neither is a visible word
    labels = torch.full_like(short, -100)
    labels[0, 3] = 5
    a, b = run(m, (images, short, labels)), run(m, (images, more_masks, labels))
    assert torch.allclose(a["pred"], b["pred"], atol=1e-6)


def test_uint8_and_single_channel_input():
    cfg = tiny_cfg()
    m = MRM(cfg)
    images, tokens, labels = make_batch(cfg)
    gray = (images[:, :1] * 255).round().to(torch.uint8)  # (B, 1, H, W) uint8, as data.py ships
    a = run(m, (gray, tokens, labels))
    b = run(m, (gray.float().div(255).expand(-1, 3, -1, -1), tokens, labels))
    assert torch.allclose(a["loss"], b["loss"])
    with pytest.raises(ValueError, match="high-res images"):
        run(m, (images[:, :, :64, :64], tokens, labels))


def test_low_res_input_is_bicubic_antialiased_and_normalised():
    cfg = tiny_cfg()
    images = torch.rand(1, 3, 128, 128)
    high, low, x = MRM(cfg).prepare_images(images)
    assert high is images and low.shape == (1, 3, 64, 64) and low.min() >= 0 and low.max() <= 1
    flat = torch.full((1, 3, 128, 128), 0.4978)  # the mean maps to 0, mean + std to 1
    assert MRM(cfg).prepare_images(flat)[2].abs().max() < 1e-5
    assert torch.allclose(MRM(cfg).prepare_images(flat + 0.2449)[2], torch.ones(1), atol=1e-5)
    gray = torch.rand(2, 1, 128, 128)  # one channel is resized once, then repeated: the same as three
    for one, three in zip(MRM(cfg).prepare_images(gray), MRM(cfg).prepare_images(gray.expand(-1, 3, -1, -1))):
        assert one.shape == three.shape and torch.equal(one, three)


def test_low_res_is_clamped_then_normalised():
    # a sharp edge makes bicubic overshoot [0, 1]; the low-res image stays a valid image
    edge = (torch.arange(128) >= 61).float().expand(1, 3, 128, 128).contiguous()
    _, low, x = MRM(tiny_cfg()).prepare_images(edge)
    raw = F.interpolate(edge, scale_factor=0.5, mode="bicubic", antialias=True)
    assert raw.min() < 0 and raw.max() > 1  # the overshoot is real
    assert torch.equal(low, raw.clamp(0, 1))
    assert torch.allclose(x, (low - 0.4978) / 0.2449, atol=1e-6)


def test_config_round_trips_through_a_plain_dict(capsys):
    cfg = tiny_cfg(fusion="gmp", mim_weight=0.5)
    assert MRMConfig.from_dict(cfg.to_dict()) == cfg and capsys.readouterr().out == ""
    # a checkpoint from another version may carry a key this one lacks: ignored, but said
    assert MRMConfig.from_dict({**cfg.to_dict(), "old_switch": 1}) == cfg
    assert "ignoring unknown keys ['old_switch']" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown preset"):
        MRMConfig.from_preset("huge")


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    m = MRM(cfg)
    batch = make_batch(cfg, B=4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(50):
        loss = run(m, batch, seed=0)["loss"]  # the same image mask every step: a true overfit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_bf16_autocast_on_cpu_is_finite():
    cfg = tiny_cfg()
    m = MRM(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(m, make_batch(cfg))
    assert out["pred"].dtype == torch.bfloat16
    for k in ("loss", "loss_mim", "loss_mlm"):
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k]), k
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_fp16_autocast_on_cpu_is_finite():
    cfg = tiny_cfg()
    with torch.autocast("cpu", dtype=torch.float16):  # the paper's setting (fp16 on RTX 3080Ti)
        out = run(MRM(cfg), make_batch(cfg))
    assert out["pred"].dtype == torch.float16
    assert all(out[k].dtype == torch.float32 and torch.isfinite(out[k]) for k in ("loss", "loss_mim", "loss_mlm"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_with_a_cpu_generator_matches_cpu():
    cfg = tiny_cfg()
    m = MRM(cfg)
    batch = make_batch(cfg)
    want = run(m, batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run(m.cuda(), tuple(t.cuda() for t in batch))  # same seed: the same masks on either device
    assert torch.equal(got["mask"].cpu(), want["mask"])
    assert torch.allclose(got["loss"].cpu(), want["loss"], rtol=0.05)


# ----------------------------------------------------------------------------- base size

@pytest.mark.slow
def test_base_sizes():
    cfg = MRMConfig()
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (224, 16, 768, 12, 12)
    m = MRM(cfg)
    n_enc = sum(p.numel() for p in m.encoder.parameters())
    n_dec = sum(p.numel() for p in m.image_decoder.parameters())
    assert n_enc == 85_798_656  # 85.8M, fixed position table included
    assert round(n_dec / 1e6, 1) == 31.5
    assert m.image_decoder.decoder_pred.out_features == 32 * 32 * 3
    assert m.fusion_proj.out_features == 384 and len(m.report_decoder.blocks) == 6
    assert not m.encoder.pos_embed.requires_grad and not m.image_decoder.decoder_pos_embed.requires_grad


@pytest.mark.slow
def test_base_forward_backward_two_records():
    cfg = MRMConfig(vocab_size=30000)
    m = MRM(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 448, 448, generator=g)
    words = torch.randint(4, 30000, (2, 100), generator=g)
    labels = torch.full_like(words, -100)
    labels[:, 1:40] = words[:, 1:40]
    tokens = words.clone()
    tokens[:, 1:40], tokens[:, 0], tokens[1, 70:] = 3, 2, 0
    with FlopCounterMode(display=False) as flops:
        out = m(images, tokens, labels, generator=g)
        out["loss"].backward()
    assert out["pred"].shape == (2, 196, 3072) and out["mask"].sum(1).tolist() == [147, 147]
    # about 78 GFLOP per record (ViT-B/16 at 224 px, both decoders) for a training step with a full-vocabulary report head; ours
    # scores the vocabulary at the masked positions only (39 of 100 here), which saves about 4 GFLOP
    assert 70e9 < flops.get_total_flops() / 2 < 78e9, flops.get_total_flops() / 2
    assert torch.isfinite(out["loss"])
    assert m.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_init_follows_spec():
    m = MRM(tiny_cfg())
    assert m.encoder.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert torch.equal(m.encoder.norm.weight, torch.ones_like(m.encoder.norm.weight))
    w = m.encoder.blocks[0].mlp.fc1.weight  # xavier-uniform: bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / sum(w.shape)) and w.abs().max() > 0.9 * math.sqrt(6 / sum(w.shape))
    w = m.encoder.patch_embed.proj.weight  # xavier on the flattened (D, C*p*p) matrix, not on the 4-D conv
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.015 < m.encoder.cls_token.std() < 0.025
    assert 0.012 < m.image_decoder.mask_token.std() < 0.028
    assert 0.015 < m.report_decoder.token_embed.weight.std() < 0.025


def test_drop_path_keeps_the_expectation_and_grows_with_depth():
    torch.manual_seed(0)
    y = drop_path(torch.ones(20000, 1, 4), 0.3, training=True)
    assert torch.allclose(y.unique(), torch.tensor([0.0, 1 / 0.7]))  # whole samples dropped, the rest rescaled
    assert abs(y.mean().item() - 1) < 0.03
    vit = ViT(32, 8, 3, 64, 4, 4, drop_path_rate=0.3)
    assert [b.drop_prob for b in vit.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_drop_path_only_in_training():
    x = torch.randn(2, 3, 32, 32)
    a, b = ViT(32, 8, 3, 64, 2, 4, drop_path_rate=0.5), ViT(32, 8, 3, 64, 2, 4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.eval()(x), b.eval()(x))
    torch.manual_seed(0)
    assert not torch.allclose(a.train()(x), b.train()(x))
