"""The two paths by which a masked report word can be restored, each learnt alone by the tiny report
decoder in a few hundred CPU steps, and checks.py's fusion check on hand-made cases.

(a) text: a masked word whose twin is visible elsewhere in the report is copied from it;
(b) image: a masked word that the image feature tells (by construction) is read from the feature.
If MRM's report decoder ignores the radiograph, these say which half of the job it cannot do."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checks
import data
import recipes
from machinery import synthetic, tokenizer
from mrm import MRM, MRMConfig, ReportDecoder, init_weights

PAD, CLS, MASK, LEFT, RIGHT, SEP = 0, 2, 3, 4, 5, 30
FINDING = 10  # finding ids 10..17


def toy_batch(n, rng, codes=None):
    """Reports of 1-3 (finding, side) pairs: [CLS] f1 s1 f2 s2 ..., with SEP and the same pairs again when
    `codes` is None (the text path); otherwise the image feature is the sum of codes[finding, side]."""
    tokens, feature = np.full((n, 24), PAD), np.zeros((n, 16), np.float32)
    tokens[:, 0] = CLS
    for b in range(n):
        k = rng.integers(1, 4)
        pairs = list(zip(rng.choice(8, k, replace=False), rng.integers(0, 2, k)))
        seq = [t for f, s in pairs for t in (FINDING + f, LEFT + s)]
        if codes is None:
            seq = seq + [SEP] + seq
        else:
            feature[b] = sum(codes[f, s] for f, s in pairs)
        tokens[b, 1:1 + len(seq)] = seq
    tokens = torch.from_numpy(tokens)
    real = tokens != PAD
    real[:, 0] = False
    chosen = real & torch.from_numpy(rng.random(tokens.shape) < 0.5)
    return torch.where(chosen, MASK, tokens), torch.where(chosen, tokens, -100), torch.from_numpy(feature)


def learn(fusion_tokens, codes=None, steps=300, seed=0):
    """Train the tiny preset's report decoder (and a projection of the feature) with Eq. 1 alone."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = MRMConfig.from_preset("tiny", vocab_size=40, max_text_len=24, fusion_tokens=fusion_tokens)
    decoder, proj = ReportDecoder(cfg), torch.nn.Linear(16, cfg.text_embed_dim)
    init_weights(proj)
    opt = torch.optim.AdamW([*decoder.parameters(), *proj.parameters()], lr=1e-3, betas=(0.9, 0.95))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = recipes.lr_at(step, steps, 20, 1e-3)
        tokens, labels, feature = toy_batch(32, rng, codes)
        loss = F.cross_entropy(decoder(tokens, proj(feature)).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return decoder.eval(), proj, rng


def test_text_path_copies_a_visible_twin():
    decoder, proj, rng = learn("visible")
    tokens, labels, feature = toy_batch(1000, rng)
    with torch.no_grad():
        pred = decoder(tokens, proj(feature)).argmax(-1)
    twin_visible, twin_masked = [], []
    for b in range(len(tokens)):
        n = int((labels[b] != -100).sum() + (tokens[b] > MASK).sum())  # real tokens after [CLS]
        half = (n - 1) // 2
        for j in range(1, n + 1):
            if labels[b, j] in (LEFT, RIGHT):
                twin = j + half + 1 if j <= half else j - half - 1
                (twin_visible if tokens[b, twin] != MASK else twin_masked).append(bool(pred[b, j] == labels[b, j]))
    # copied when in sight; a coin toss when the twin is masked too (nothing else tells the side)
    assert np.mean(twin_visible) > 0.95 and len(twin_visible) > 300
    assert np.mean(twin_masked) < 0.7 and len(twin_masked) > 300


@pytest.mark.parametrize("fusion_tokens", ["visible", "all"])
def test_image_path_reads_the_side_from_the_feature(fusion_tokens):
    codes = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(1)).numpy()
    decoder, proj, rng = learn(fusion_tokens, codes)
    tokens, labels, feature = toy_batch(1000, rng, codes)
    side = (labels == LEFT) | (labels == RIGHT)
    accuracy = {}
    with torch.no_grad():
        for condition, f in (("film", feature), ("noise", feature[torch.randperm(len(feature))])):
            accuracy[condition] = float((decoder(tokens, proj(f)).argmax(-1)[side] == labels[side]).float().mean())
    # 'visible' (the paper): a [MASK] position reads the feature through attention to the visible tokens
    assert accuracy["film"] > 0.8 and accuracy["noise"] < 0.6, accuracy


# -----------------------------------------------------------------------------
# checks.fusion_check on hand-made cases


def tiny_model_and_tokenizer(seed=0):
    reports = [synthetic.synth_report(i) for i in range(200)]
    tok = tokenizer.train_tokenizer(reports)
    torch.manual_seed(seed)
    cfg = MRMConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"),
                                mask_token_id=tok.token_to_id("[MASK]"))
    return MRM(cfg).eval(), tok


def test_fusion_check_groups_and_twins_by_hand():
    model, tok = tiny_model_and_tokenizer()
    films, _ = checks.held_out(checks.CHECK_START, 2, 128)
    reports = ["FINDINGS: Small left pleural effusion. IMPRESSION: Small left pleural effusion.",
               "FINDINGS: Large right pneumothorax. IMPRESSION: Pneumothorax."]
    result = checks.fusion_check(model, tok, films, reports, masks_per_report=3)
    count = {g: v["count"] for g, v in result.items()}
    assert count["all"] == count["side"] + count["size"] + count["zone"] + count["presence"] + count["other"]
    assert count["image_only"] + count["with_twin"] == count["side"] + count["size"] + count["zone"]
    # which masked words were in sight, from the same masks as the check draws (seed 0, stream 7)
    rng, cfg = np.random.default_rng([0, 7]), model.cfg
    ids = data.encode_reports(tok, reports, cfg.max_text_len)
    attribute = {tok.token_to_id(w) for g in checks.ATTRIBUTES for w in checks.WORD_GROUPS[g]} - {None}
    expected = {"image_only": 0, "with_twin": 0}
    for _ in range(3):
        for t in ids:
            masked, labels = data.mask_report(t, 0.5, rng, cfg.mask_token_id, cfg.pad_token_id)  # Sec. 3.1's
            for j in np.flatnonzero(labels != -100):
                if labels[j] in attribute:
                    expected["with_twin" if labels[j] in masked else "image_only"] += 1
    assert {g: count[g] for g in expected} == expected
    assert expected["with_twin"] > 0 and expected["image_only"] > 0
    for g, v in result.items():
        assert 0 <= v["film"] <= 1 and 0 <= v["noise"] <= 1, g


def test_film_and_noise_score_alike_when_no_image_reaches_the_words():
    model, tok = tiny_model_and_tokenizer()
    torch.nn.init.zeros_(model.fusion_proj.weight)
    torch.nn.init.zeros_(model.fusion_proj.bias)
    films, reports = checks.held_out(checks.CHECK_START, 20, 128)
    result = checks.fusion_check(model, tok, films, reports, masks_per_report=2)
    # the same text masks and image masks in both conditions: identical guesses
    assert all(v["film"] == v["noise"] == v["other_film"] for v in result.values())
    assert "film" in checks.summary(result)


def test_pooled_spread_of_one_repeated_film_is_zero():
    model, _ = tiny_model_and_tokenizer()
    films, _ = checks.held_out(checks.CHECK_START, 8, 128)
    assert checks.pooled_spread(model.encoder, model.prepare_images, np.repeat(films[:1], 4, 0)) < 1e-5
    assert checks.pooled_spread(model.encoder, model.prepare_images, films) > 0.01


def test_held_out_records_are_not_training_records():
    films, reports = checks.held_out(checks.CHECK_START, 3, 64)
    assert films.shape == (3, 64, 64) and films.dtype == np.uint8
    assert reports == [synthetic.synth_report(checks.CHECK_START + i) for i in range(3)]
    assert checks.CHECK_START > 1_000_000 + 10 ** 5  # beyond the fine-tuning records too


def test_the_other_film_is_another_record_s_whatever_the_batches():
    # 3 records in batches of 2: the last batch holds one record, and its other film is still another's
    model, tok = tiny_model_and_tokenizer()
    films, reports = checks.held_out(checks.CHECK_START, 3, 128)
    seen, forward = [], model.forward

    def spy(images, *args, **kwargs):
        seen.append(images)
        return forward(images, *args, **kwargs)

    model.forward = spy
    checks.fusion_check(model, tok, films, reports, masks_per_report=1, batch=2)
    film, other = torch.cat(seen[0::3]), torch.cat(seen[2::3])  # a batch: its films, noise, other films
    assert torch.equal(film[:, 0], torch.from_numpy(films))
    assert torch.equal(other[:, 0], torch.from_numpy(films[[2, 0, 1]]))  # each record the one before it's
