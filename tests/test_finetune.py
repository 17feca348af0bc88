"""finetune.py and what it reads: the metrics (metrics.py) against hand-worked values, the data views and split
lists (finetune_data.py), the heads, and whole runs on synthetic data."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import finetune
import finetune_data
import metrics
import recipes
from finetune import FinetuneConfig
from finetune_data import label_subset
from machinery import settings, synthetic
from machinery.checkpoints import interpolate_pos_embed, load_pretrained
from machinery.errors import ConfigError, NonFiniteLoss
from metrics import dice_per_image, roc_auc
from mrm import MRMConfig, ViT, get_2d_sincos_pos_embed

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# -----------------------------------------------------------------------------
# Metrics


def test_roc_auc_by_hand():
    # positives 0.35 and 0.8, negatives 0.1 and 0.4: 3 of the 4 pairs are ordered right
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # a positive tied with a negative counts half: (0.5 + 1 + 1 + 1) / 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
    assert roc_auc([0, 1, 1, 0, 1], [0.3] * 5) == 0.5  # all tied
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    # three tied positives and a negative inside the tie: ranks 1, 3, 3, 3, 5 -> (3 + 3 + 5 - 6) / 6... by pairs:
    # positives 0.5, 0.5, 0.9 vs negatives 0.1, 0.5: (1 + .5) + (1 + .5) + (1 + 1) = 5 of 6
    assert roc_auc([1, 1, 1, 0, 0], [0.5, 0.5, 0.9, 0.1, 0.5]) == pytest.approx(5 / 6)


def test_roc_auc_per_label_and_single_class():
    y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]])
    s = np.array([[0.1, 0.3], [0.9, 0.2], [0.2, 0.1], [0.8, 0.4]])
    aucs = roc_auc(y, s)
    assert aucs[0] == 1.0 and math.isnan(aucs[1])  # label 2 has positives only
    with pytest.warns(UserWarning, match="'Edema' has one class only"):
        assert metrics.mean_auc(aucs, ["Cardiomegaly", "Edema"], "test") == 1.0


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 10, 200) / 10  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert roc_auc(y, s) == pytest.approx(pairs, abs=1e-12)


def test_dice_per_image_by_hand():
    pred = np.zeros((4, 2, 2), bool)
    target = np.zeros((4, 2, 2), bool)
    # 0: both empty -> 1; 1: empty truth, a false alarm -> 0; 2: missed finding -> 0
    pred[1, 0, 0] = True
    target[2, 1, 1] = True
    # 3: two predicted pixels, two true ones, one shared -> 2 * 1 / (2 + 2)
    pred[3, 0, :] = True
    target[3, :, 0] = True
    assert dice_per_image(pred, target).tolist() == [1.0, 0.0, 0.0, 0.5]


def test_segmentation_losses_by_hand():
    logits, target = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    # p = 0.5 everywhere: alpha * (1 - p)^2 * ln 2, alpha 0.5 (mmseg's default, as released)
    assert finetune.focal_loss(logits, target).item() == pytest.approx(0.5 * 0.25 * math.log(2))
    # a background pixel weighs (1 - alpha): the same 0.5 here
    assert finetune.focal_loss(logits, 1 - target).item() == pytest.approx(0.5 * 0.25 * math.log(2))
    # soft Dice with p = 0.5 on 4 true pixels: 1 - (2 * 2 + 1) / (2 + 4 + 1)
    assert finetune.dice_loss(logits, target).item() == pytest.approx(1 - 5 / 7)
    assert finetune.dice_loss(torch.full((1, 1, 2, 2), 30.0), target).item() == pytest.approx(0, abs=1e-6)


def test_poly_lr():
    assert recipes.poly_lr_at(0, 100, 10, 1.0) == 0.0
    assert recipes.poly_lr_at(5, 100, 10, 1.0) == 0.5
    assert recipes.poly_lr_at(10, 100, 10, 1.0) == 1.0
    assert recipes.poly_lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert recipes.poly_lr_at(100, 100, 10, 1.0) == 0.0


# -----------------------------------------------------------------------------
# Data


def test_label_fraction_subset_sizes():
    assert len(label_subset(78467, 0.01, 0)) == 785  # NIH's 1% list has 785 images
    assert len(label_subset(1000, 0.1, 0)) == 100
    assert len(label_subset(7, 0.01, 0)) == 1  # never empty
    a, b = label_subset(1000, 0.1, 0), label_subset(1000, 0.1, 1)
    assert (a == label_subset(1000, 0.1, 0)).all() and not (a == b).all()  # seeded
    assert len(np.unique(a)) == len(a) and (np.diff(a) > 0).all()
    for bad in (0, 1.5):
        with pytest.raises(ValueError):
            label_subset(10, bad, 0)


def write_list(tmp_path, lines, images=("a.png", "b.png")):
    for name in images:
        Image.new("L", (40, 30), 100).save(tmp_path / name)
    path = tmp_path / "list.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_read_split_list_and_its_errors(tmp_path):
    files, labels = finetune_data.read_split_list(write_list(tmp_path, ["a.png 0 1", "", "b.png 1 0 "]), "")
    assert len(files) == 2 and labels.tolist() == [[0, 1], [1, 0]]
    assert "line 3" in files.where(1)
    with pytest.raises(data.BadRecord, match=r"list.txt, line 2: expected 2 labels, got 1"):
        finetune_data.read_split_list(write_list(tmp_path, ["a.png 0 1", "b.png 1"]), "")
    with pytest.raises(data.BadRecord, match="line 1: labels must be numbers"):
        finetune_data.read_split_list(write_list(tmp_path, ["a.png 0 nan"]), "")
    with pytest.raises(data.BadRecord, match=r"1 of 2 images missing .*line 2: .*c.png"):
        finetune_data.read_split_list(write_list(tmp_path, ["a.png 1", "c.png 0"]), "")
    with pytest.raises(data.BadRecord, match="expected 14 labels"):
        finetune_data.read_split_list(write_list(tmp_path, ["a.png 0 1"]), "", num_labels=14)
    with pytest.raises(data.BadRecord, match="empty"):
        finetune_data.read_split_list(write_list(tmp_path, []), "")


def test_ids_of_siim_lists_keep_their_dots():
    siim = "1.2.276.0.7230010.3.1.4.8323329.2181.1517875171.516361"
    assert finetune_data._stem(siim) == siim
    assert finetune_data._stem(f"dicom/{siim}.dcm") == siim and finetune_data._stem("a/b.PNG") == "b"


def test_segmentation_from_id_lists_reads_films_and_masks(tmp_path):
    # SIIM's lists hold image ids, and each film its <id>.png mask (prepare.py siim-masks): read, not refused
    for folder in ("films", "masks"):
        (tmp_path / folder).mkdir()
    for i, image_id in enumerate(["1.2.3", "1.2.4"]):
        Image.new("L", (48, 48), 60 * i).save(tmp_path / "films" / f"{image_id}.png")
        Image.fromarray(np.uint8(np.eye(48) * 255)).save(tmp_path / "masks" / f"{image_id}.png")
    (tmp_path / "ids.txt").write_text("1.2.3\n1.2.4\n")
    cfg = FinetuneConfig(task="segment", dataset="siim", image_root=str(tmp_path / "films"),
                         mask_root=str(tmp_path / "masks"), **{f"{k}_list": str(tmp_path / "ids.txt")
                                                               for k in ("train", "val", "test")})
    splits, _ = finetune_data.build_splits(cfg, 32)
    item = splits["val"][0]
    assert item["image"].shape == (1, 32, 32) and item["target"].shape == (32, 32) and item["target"].any()


def test_split_lists_must_agree_and_validation_must_have_both_classes(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("L", (40, 30), 100).save(tmp_path / name)
    (tmp_path / "train.txt").write_text("a.png 0 1 0\nb.png 1 0 1\n")
    (tmp_path / "two.txt").write_text("a.png 0 1\nb.png 1 0\n")
    (tmp_path / "one_class.txt").write_text("a.png 1 1 0\nb.png 1 1 0\n")
    cfg = lambda val: FinetuneConfig(dataset="custom", train_list=str(tmp_path / "train.txt"),  # noqa: E731
                                     val_list=str(tmp_path / val), test_list=str(tmp_path / "train.txt"))
    with pytest.raises(data.BadRecord, match=r"two.txt, line 1: expected 3 labels, got 2"):
        finetune_data.build_splits(cfg("two.txt"), 32)
    with pytest.raises(data.BadRecord, match="one_class.txt: every label has one class only"):
        finetune_data.build_splits(cfg("one_class.txt"), 32)


def test_step_sampler_epochs_and_resume():
    full = list(finetune_data.StepSampler(n=5, batch_size=2, steps=6, seed=3))
    assert [p for _, p in full] == list(range(12))
    for epoch in range(2):  # each epoch is a permutation of the records
        assert sorted(i for i, _ in full[5 * epoch:5 * epoch + 5]) == list(range(5))
    assert list(finetune_data.StepSampler(5, 2, 6, seed=3, start_step=4)) == full[8:]


def test_train_view_crops_mask_with_image():
    img = np.zeros((60, 80), np.uint8)
    img[:, :30] = 255  # bright left part, which the mask marks
    image, mask = Image.fromarray(img), Image.fromarray((img > 0).astype(np.uint8) * 255)
    flips = 0
    for seed in range(20):
        a, m = finetune_data.train_view(image, 32, np.random.default_rng(seed), (0.5, 1.0), mask)
        assert a.shape == m.shape == (32, 32)
        agree = ((a > 127) == (m > 0)).mean()
        assert agree > 0.95
        flips += m[:, -1].mean() > m[:, 0].mean()  # the marked side moved right
    assert 0 < flips < 20


def test_min_crop_one_trains_on_the_whole_film():
    """--min_crop 1 (the miniature's 0.8 leans this way): every training view is the evaluation view
    of the whole square film, or its mirror; the released 0.08 crops."""
    films = finetune_data.SyntheticFilms(finetune_data.SYNTH_START, 2, 64)
    labels = films.labels
    whole = finetune_data.FinetuneDataset(films, 32, labels, min_crop=1.0)
    spec = finetune_data.FinetuneDataset(films, 32, labels)
    for p in range(6):
        view, test = whole[(1, p)]["image"][0].numpy(), whole[1]["image"][0].numpy()
        assert np.array_equal(view, test) or np.array_equal(view, test[:, ::-1])
    assert sum(not np.array_equal(spec[(1, p)]["image"], spec[1]["image"]) for p in range(6)) >= 5


def test_test_view_is_centre_square():
    img = np.zeros((40, 80), np.uint8)
    img[:, 20:60] = 200  # the centred 40 x 40 square
    out, _ = finetune_data.eval_view(Image.fromarray(img), 20)
    # the resampling reads a pixel beyond the box at its edges: the border columns blend a little black in
    assert (out[:, 1:-1] >= 199).all() and (out > 150).all()


# -----------------------------------------------------------------------------
# Models


def test_classifier_head_init_and_pooling():
    torch.manual_seed(0)
    enc = ViT(32, 8, 3, 48, 2, 3)
    model = finetune.Classifier(enc, 14)
    w = model.head.weight
    # trunc_normal_(std=2e-5) cuts at +-2 absolute (as MAE's timm call): in effect normal(0, 2e-5)
    assert w.std().item() == pytest.approx(2e-5, rel=0.2) and w.abs().max().item() < 1e-4
    assert (model.head.bias == 0).all()
    x = torch.randn(2, 3, 32, 32)
    probs = torch.sigmoid(model(x))
    assert probs.shape == (2, 14) and (probs - 0.5).abs().max() < 1e-3  # every label starts near 0.5
    # GAP of the last block's patch tokens (not [CLS], not the encoder's final norm), then fc_norm
    tokens = enc.hidden_states(x, [2])[0]
    assert torch.allclose(model(x), model.head(model.fc_norm(tokens[:, 1:].mean(1))))
    hidden = enc.hidden_states(x, [1, 2])
    assert torch.allclose(enc.norm(hidden[1]), enc(x), atol=1e-6)


def test_position_table_interpolation():
    table = torch.from_numpy(get_2d_sincos_pos_embed(16, 4, cls_token=True))[None]
    assert interpolate_pos_embed(table, 4) is table  # same size: the table itself
    big = interpolate_pos_embed(table, 8)
    assert big.shape == (1, 65, 16) and torch.equal(big[:, 0], table[:, 0])  # [CLS] row kept
    grid = big[0, 1:].reshape(8, 8, 16)
    # a constant table stays constant under bicubic resizing
    const = torch.ones(1, 17, 4)
    assert torch.allclose(interpolate_pos_embed(const, 6), torch.ones(1, 37, 4), atol=1e-6)
    assert torch.isfinite(grid).all()
    with pytest.raises(ValueError, match="square grid"):  # e.g. the report decoder's 100 positions
        interpolate_pos_embed(torch.zeros(1, 100, 4), 8)


def test_load_pretrained_interpolates_position_table(tmp_path, capsys):
    torch.manual_seed(0)
    small = ViT(32, 8, 3, 48, 2, 3)
    path = tmp_path / "w.pt"
    torch.save({"model": small.state_dict()}, path)
    big = ViT(64, 8, 3, 48, 2, 3)
    report = load_pretrained(big, path)
    assert report["resized"] == ["pos_embed 4^2 -> 8^2"] and not report["mismatched"]
    assert torch.equal(big.pos_embed, interpolate_pos_embed(small.pos_embed, 8))
    assert torch.equal(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    assert "position table interpolated" in capsys.readouterr().out


def test_segmenter_shapes_and_taps():
    enc = ViT(64, 8, 3, 48, 12, 3)
    model = finetune.Segmenter(enc, channels=24, aux_channels=16).eval()
    assert model.taps == [4, 6, 8, 12]  # the released upernet_mrm.py: blocks 4, 6, 8, 12
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 64, 64)  # evaluation: the main head only
    out.sum().backward()
    assert enc.blocks[11].mlp.fc2.weight.grad is not None and enc.blocks[0].attn.qkv.weight.grad is not None
    main, aux = model.train()(torch.randn(2, 3, 64, 64))  # training: the auxiliary FCN head too (released)
    assert main.shape == aux.shape == (2, 1, 64, 64) and model.aux[0][0].out_channels == 16
    assert recipes.SEG_HEADS["base"] == {"channels": 768, "aux_channels": 256}


def test_segmentation_train_view_is_the_whole_film_or_its_mirror():
    films = finetune_data.SyntheticFilms(finetune_data.SYNTH_START, 2, 64, ("pneumothorax",))
    ds = finetune_data.FinetuneDataset(films, 32, masks=films)
    test = ds[1]
    mirrored = 0
    for p in range(8):
        view = ds[(1, p)]
        same = np.array_equal(view["image"], test["image"]) and torch.equal(view["target"], test["target"])
        flipped = np.array_equal(view["image"][0].numpy(), test["image"][0].numpy()[:, ::-1]) and \
            torch.equal(view["target"], test["target"].flip(-1))
        assert same or flipped
        mirrored += flipped and not same
    assert 0 < mirrored < 8


def test_layer_decay_groups():
    enc = ViT(32, 8, 3, 48, 12, 3)
    model = finetune.Segmenter(enc)
    groups = recipes.layer_decay_groups(model, 0.05, 0.65)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert scale[id(model.classifier.weight)] == (1.0, 0.05)
    assert scale[id(enc.blocks[11].attn.qkv.weight)] == (pytest.approx(0.65), 0.05)
    assert scale[id(enc.blocks[0].attn.qkv.bias)] == (pytest.approx(0.65 ** 12), 0.0)
    assert scale[id(enc.patch_embed.proj.weight)] == (pytest.approx(0.65 ** 13), 0.05)
    assert scale[id(enc.cls_token)] == (pytest.approx(0.65 ** 13), 0.0)
    assert id(enc.pos_embed) not in scale and id(enc.norm.weight) not in scale  # frozen / unused


# -----------------------------------------------------------------------------
# Whole runs on synthetic records (tiny model, a few steps)


def small_config(tmp_path, **kw) -> FinetuneConfig:
    # the released recipe's SGD and near-0 head at lr 0.1 (the demo's LP-FT and AdamW: their own tests)
    base = dict(init="none", num_records=32, num_val=16, num_test=24, steps=4, eval_every=2, batch_size=8,
                num_workers=0, out=str(tmp_path / "ft"), lr=0.1)
    if kw.get("task", "classify") == "classify":
        base.update(optimizer="sgd", head_init="zero")
    return FinetuneConfig(**{**base, **kw})


def test_classification_end_to_end(tmp_path):
    results = finetune.finetune(small_config(tmp_path))
    assert set(results["test_auc"]) == set(synthetic.FINDINGS)
    assert 0 <= results["test_auc_mean"] <= 1 and results["sizes"] == {"train": 32, "val": 16, "test": 24}
    saved = json.loads(Path(tmp_path / "ft" / "results.json").read_text())
    assert saved["test_auc_mean"] == results["test_auc_mean"]
    best = torch.load(results["checkpoint"], weights_only=True)
    assert best["step"] == results["best_step"] and best["labels"] == list(synthetic.FINDINGS)
    log = [json.loads(line) for line in open(tmp_path / "ft" / "lr_0.1" / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4]


def test_lr_grid_selects_on_validation_and_tests_once(tmp_path, monkeypatch):
    calls = []
    evaluate = finetune.evaluate

    def counted(model, dataset, cfg, sizes, device, dtype, desc):
        calls.append(desc)
        return evaluate(model, dataset, cfg, sizes, device, dtype, desc)

    monkeypatch.setattr(finetune, "evaluate", counted)
    results = finetune.finetune(small_config(tmp_path, lr_grid="0.1,0.001", steps=2, eval_every=1))
    assert calls.count("test") == 1 and calls.count("validation") == 4
    val = results["val_by_lr"]
    assert results["selected_lr"] == float(max(val, key=val.get))
    assert os.path.exists(tmp_path / "ft" / "lr_0.1" / "best.pt") and os.path.exists(tmp_path / "ft" / "lr_0.001" / "best.pt")


def test_label_fraction_run_and_linear_probe(tmp_path, monkeypatch):
    modes, forward = [], finetune.Classifier.forward

    def spy(self, x):  # the frozen encoder stays in eval mode (no drop-path), also after a validation
        if self.training:
            modes.append(self.encoder.training)
        return forward(self, x)

    monkeypatch.setattr(finetune.Classifier, "forward", spy)
    cfg = small_config(tmp_path, label_fraction=0.25, linear_probe=True, steps=2, eval_every=1)
    results = finetune.finetune(cfg)
    assert modes == [False, False]
    assert results["sizes"]["train"] == 8
    best = torch.load(results["checkpoint"], weights_only=True)["model"]
    # the frozen encoder did not move: compare with the model rebuilt from the same seed
    torch.manual_seed(cfg.seed)
    sizes = settings.encoder_sizes("none", cfg.preset, cfg.dataset)
    same_init = finetune.build_model(recipes.fill_finetuning(cfg), sizes, 64, None, 6).state_dict()
    assert torch.equal(best["encoder.blocks.0.attn.qkv.weight"], same_init["encoder.blocks.0.attn.qkv.weight"])
    assert not torch.equal(best["head.weight"], same_init["head.weight"])


def test_head_fitted_to_a_probe_starts_fine_tuning_at_the_probe(tmp_path, monkeypatch):
    """LP-FT: the folded head scores the validation views exactly as the standardised probe does, that
    start is validated (step 0) and kept unless fine-tuning beats it on validation."""
    fitted = {}
    probe_fit = finetune.fit_head_to_probe

    def spy(model, datasets, cfg, sizes, device, dtype):
        fitted.update(probe_fit(model, datasets, cfg, sizes, device, dtype))
        x = {k: finetune.head_inputs(model, datasets[k], cfg, sizes, device, None) for k in ("train", "val")}
        mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
        w, b = metrics.logistic_regression((x["train"] - mean) / std, torch.as_tensor(datasets["train"].labels),
                                          fitted["weight_decay"])
        with torch.no_grad():
            assert torch.allclose(model.head(x["val"]), (x["val"] - mean) / std @ w + b, atol=1e-3)
        fitted["probe_val"] = metrics.mean_auc(roc_auc(datasets["val"].labels, model.head(x["val"]).detach().numpy()),
                                                synthetic.FINDINGS)
        return fitted

    monkeypatch.setattr(finetune, "fit_head_to_probe", spy)
    results = finetune.finetune(small_config(tmp_path, head_init="probe", steps=4, eval_every=2))
    log = [json.loads(line) for line in open(tmp_path / "ft" / "lr_0.1" / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 2, 4] and log[0]["train_loss"] is None
    assert log[0]["val_auc_mean"] == pytest.approx(fitted["val"]) == pytest.approx(fitted["probe_val"])
    assert results["val_auc_mean"] == max(r["val_auc_mean"] for r in log) >= fitted["val"]
    with pytest.raises(ConfigError, match="for classification"):
        recipes.fill_finetuning(small_config(tmp_path, task="segment", head_init="probe"))


def test_segmentation_end_to_end(tmp_path, capsys):
    results = finetune.finetune(small_config(tmp_path, task="segment", seg_findings="pneumothorax,pleural effusion",
                                        num_records=16, num_val=8, num_test=8, steps=2, eval_every=1, input_size=128))
    assert 0 <= results["test_dice"] <= 1 and "val_dice" in results
    share = results["test_share_without_finding"]
    parts = [results["test_dice_with_finding"] or 0, results["test_dice_without_finding"] or 0]
    assert results["test_dice"] == pytest.approx((1 - share) * parts[0] + share * parts[1])
    n_with = round(8 * (1 - share))
    assert f"on the {n_with} images with the finding" in capsys.readouterr().out  # the three numbers, printed
    best = torch.load(results["checkpoint"], weights_only=True)["model"]
    assert best["encoder.pos_embed"].shape == (1, 1 + 16 * 16, 192)  # tiny: 64 -> 128 px, grid 8 -> 16


def test_finetune_from_pretrained_checkpoint(tmp_path, capsys):
    import train

    pre = tmp_path / "pre"
    train.main(["--num_records", "32", "--epochs", "1", "--batch_size", "16", "--num_workers", "0", "--out", str(pre),
                "--fusion_check", "0"])
    results = finetune.finetune(small_config(tmp_path, init=str(pre / "ckpt.pt"), steps=2))
    said = capsys.readouterr().out
    assert f"encoder: 78/78 tensors from {pre / 'ckpt.pt'}; unused: image_decoder (" in said
    assert "missing" not in said
    assert results["init"] == str(pre / "ckpt.pt")
    # beside the result, the random encoder's probe and which start is better (scratch runs print no such line)
    scratch = results["random_encoder_probe_test_auc_mean"]
    verdict = "better" if results["test_auc_mean"] > scratch else "worse"
    assert f"test mean AUC {scratch:.4f}; this run {results['test_auc_mean']:.4f}: the pre-trained start is " \
           f"{verdict} than scratch here" in said


def stop_at_second_validation(monkeypatch):
    """From here, a run is interrupted (KeyboardInterrupt) as its second validation begins. Returns the real
    finetune.evaluate."""
    evaluate, calls = finetune.evaluate, []

    def stop_on_second_validation(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(finetune, "evaluate", stop_on_second_validation)
    return evaluate


def run_stopped_at_second_validation(cfg: FinetuneConfig, monkeypatch):
    """Run cfg and interrupt it as its second validation begins: last.pt holds the first one's state."""
    evaluate = stop_at_second_validation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune(cfg)
    monkeypatch.setattr(finetune, "evaluate", evaluate)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Stopped at its second validation (step 26) and resumed from the first (13): the same weights, test
    scores and log.jsonl, training-loss lines (every 10 steps, the window restarting at a validation) included."""
    cfg = dict(steps=26, eval_every=13)
    whole = finetune.finetune(small_config(tmp_path, out=str(tmp_path / "whole"), **cfg))
    run_stopped_at_second_validation(small_config(tmp_path, out=str(tmp_path / "cut"), **cfg), monkeypatch)
    assert torch.load(tmp_path / "cut" / "lr_0.1" / "last.pt", weights_only=False)["step"] == 13
    assert [json.loads(line)["step"] for line in open(tmp_path / "cut" / "lr_0.1" / "log.jsonl")] == [10, 13, 20]
    resumed = finetune.finetune(small_config(tmp_path, out=str(tmp_path / "cut"), resume=True, **cfg))
    a = torch.load(tmp_path / "whole" / "lr_0.1" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "lr_0.1" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_auc"] == whole["test_auc"]
    logs = [open(tmp_path / run / "lr_0.1" / "log.jsonl").read() for run in ("whole", "cut")]
    assert logs[0] == logs[1] and logs[0].count("\n") == 4  # steps 10, 13, 20, 26
    with pytest.raises(ValueError, match="changed: batch_size 8 -> 4"):
        finetune.finetune(small_config(tmp_path, out=str(tmp_path / "cut"), resume=True, batch_size=4, **cfg))


def test_resume_after_the_probe_start_continues_exactly(tmp_path, monkeypatch):
    # LP-FT: the first validation is the probe start (step 0); stopped at the second, the run resumes from
    # the probed head without fitting it again
    cfg = dict(steps=4, head_init="probe")
    whole = finetune.finetune(small_config(tmp_path, out=str(tmp_path / "whole"), **cfg))
    run_stopped_at_second_validation(small_config(tmp_path, out=str(tmp_path / "cut"), **cfg), monkeypatch)
    assert torch.load(tmp_path / "cut" / "lr_0.1" / "last.pt", weights_only=False)["step"] == 0
    monkeypatch.setattr(finetune, "fit_head_to_probe", lambda *a: pytest.fail("the probe was fitted again"))
    resumed = finetune.finetune(small_config(tmp_path, out=str(tmp_path / "cut"), resume=True, **cfg))
    a = torch.load(tmp_path / "whole" / "lr_0.1" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "lr_0.1" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_auc"] == whole["test_auc"]
    assert [json.loads(line)["step"] for line in open(tmp_path / "cut" / "lr_0.1" / "log.jsonl")] == [0, 2, 4]


def test_nan_loss_stops_and_keeps_checkpoints(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, steps=4)
    to_input, calls = finetune.to_input, []

    def poisoned(images, device, sizes):
        calls.append(1)
        x = to_input(images, device, sizes)
        return x * float("nan") if len(calls) > 4 else x  # steps 1-2, 2 validation batches, then NaN

    monkeypatch.setattr(finetune, "to_input", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        finetune.finetune(cfg)
    last = torch.load(tmp_path / "ft" / "lr_0.1" / "last.pt", weights_only=False)
    assert last["step"] == 2 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# -----------------------------------------------------------------------------
# Real films (skipped without ../shared/data)


@pytest.mark.skipif(not (SHARED / "covid19").exists(), reason="../shared/data/covid19 is absent")
def test_covid19_split_loads_every_film():
    root = SHARED / "covid19" / "images"
    modes = set()
    for split in ("train", "val", "test"):
        files, labels = finetune_data.read_split_list(str(SHARED / "covid19" / "covid1" / f"iscovid_{split}.txt"), str(root), 1)
        ds = finetune_data.FinetuneDataset(files, 64, labels)
        for i in range(len(ds)):
            with Image.open(files.path(i)) as im:
                modes.add(im.mode)
            train_item, test_item = ds[(i, i)], ds[i]
            assert train_item["image"].shape == test_item["image"].shape == (1, 64, 64)
            assert train_item["image"].dtype == torch.uint8
    assert {"RGB", "L"} <= modes


def test_resume_may_switch_to_fp16(tmp_path, monkeypatch):
    run_stopped_at_second_validation(small_config(tmp_path, amp="off"), monkeypatch)
    # the stopped run had no grad scaler (fp32); an fp16 resume starts a fresh one instead of failing
    results = finetune.finetune(small_config(tmp_path, amp="fp16", resume=True))
    assert results["best_step"] in (2, 4)
    assert torch.load(tmp_path / "ft" / "lr_0.1" / "last.pt", weights_only=False)["step"] == 4


def test_a_list_of_another_label_count_says_which_dataset_fits(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("L", (8, 8)).save(tmp_path / name)
    (tmp_path / "one.txt").write_text("a.png 1\nb.png 0\n")
    lists = dict(train_list=str(tmp_path / "one.txt"), val_list=str(tmp_path / "one.txt"),
                 test_list=str(tmp_path / "one.txt"))
    with pytest.raises(ConfigError, match=r"one.txt: 1 label\(s\) a line, not the 6 of --dataset synthetic "
                                          r"\(the default\): pass --dataset rsna or covid or viral"):
        finetune_data.build_splits(FinetuneConfig(**lists), 32)
    with pytest.raises(ConfigError, match=r"not the 14 of --dataset nih: pass --dataset rsna or covid or viral"):
        finetune_data.build_splits(FinetuneConfig(dataset="nih", **lists), 32)
    splits, names = finetune_data.build_splits(FinetuneConfig(dataset="covid", **lists), 32)
    assert names == ("COVID-19",) and len(splits["train"]) == 2


def dry_run(capsys, *argv) -> dict:
    finetune.main(["--dry_run", *argv])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("dataset, ratio, schedule", [
    ("nih", 1, (50, 3000, 3e-2)), ("chexpert", 10, (1500, 60000, 5e-4)), ("rsna", 100, (2000, 50000, 5e-4))])
def test_dry_run_resolves_the_released_schedules_without_reading_images(tmp_path, capsys, dataset, ratio, schedule):
    k = len(finetune_data.LABEL_NAMES[dataset])
    for name, n in (("train", 250), ("val", 40), ("test", 60)):  # images that do not exist: never opened
        (tmp_path / f"{name}.txt").write_text("".join(f"missing/{i}.png" + f" {i % 2}" * k + "\n" for i in range(n)))
    plan = dry_run(capsys, "--dataset", dataset, "--ratio", str(ratio), "--init", "none", "--out", str(tmp_path / "o"),
                   *[f"--{s}_list={tmp_path / s}.txt" for s in ("train", "val", "test")])
    warmup, steps, lr = schedule
    assert plan["schedule"] == {"steps": steps, "warmup_steps": warmup, "batch_size": 96, "lr": [lr],
                                "epochs": round(steps * 96 / 250, 2), "eval_every": 3,  # once an epoch: 250 / 96
                                "validations": math.ceil(steps / 3), "lr_schedule": "linear warm-up, then cosine to 0"}
    assert plan["records"] == {"train": 250, "val": 40, "test": 60} and len(plan["label_names"]) == k
    assert plan["encoder"]["preset"] == "base" and plan["encoder"]["input_size"] == 224
    assert plan["head"] == f"mean of the patch tokens, LayerNorm, Linear 768 -> {k}"
    assert not (tmp_path / "o").exists()


def test_dry_run_of_the_demo_and_of_segmentation(capsys, tmp_path):
    demo = dry_run(capsys, "--init", "none", "--out", str(tmp_path))
    assert demo["schedule"]["steps"] == 300 and demo["schedule"]["eval_every"] == 63  # 2,000 / 32, once an epoch
    assert demo["records"] == {"train": 2000, "val": 500, "test": 1000} and demo["encoder"]["input_size"] == 64
    seg = dry_run(capsys, "--task", "segment", "--init", "none", "--preset", "base", "--dataset", "siim")
    assert seg["encoder"]["input_size"] == 512 and seg["optimizer"].startswith("AdamW")
    assert seg["schedule"]["steps"] == 160000 and seg["schedule"]["warmup_steps"] == 1500  # released, 100%
    assert seg["schedule"]["batch_size"] == 8 and seg["schedule"]["eval_every"] == 500
    seg10 = dry_run(capsys, "--task", "segment", "--init", "none", "--preset", "base", "--dataset", "siim",
                    "--ratio", "10")
    assert (seg10["schedule"]["steps"], seg10["schedule"]["warmup_steps"], seg10["schedule"]["eval_every"]) == \
        (5000, 100, 50)
    # the recipe follows the records, not the encoder's size: the synthetic ones take the demo's with a base
    # encoder, a tiny encoder on SIIM's lists the released one
    synth = dry_run(capsys, "--task", "segment", "--init", "none", "--preset", "base", "--num_records", "20")
    assert (synth["schedule"]["steps"], synth["schedule"]["batch_size"], synth["schedule"]["lr"]) == (300, 32, [3e-3])
    tiny = dry_run(capsys, "--task", "segment", "--init", "none", "--preset", "tiny", "--dataset", "siim")
    assert (tiny["schedule"]["steps"], tiny["schedule"]["batch_size"], tiny["schedule"]["lr"]) == (160000, 8, [2e-5])


@pytest.mark.parametrize("argv, schedule", [
    (["--task", "segment", "--dataset", "siim", "--ratio", "10"], (5000, 100, 2e-5, 8, 50)),
    (["--task", "segment", "--dataset", "siim", "--ratio", "100"], (160000, 1500, 2e-5, 8, 500)),
    (["--dataset", "nih", "--ratio", "1"], (3000, 50, 3e-2, 96, "once an epoch (give the lists to count it)")),
])
def test_dry_run_without_lists_prints_the_released_schedule(tmp_path, monkeypatch, capsys, argv, schedule):
    monkeypatch.chdir(tmp_path)  # no out/ckpt.pt here: the base encoder, as for the real datasets
    s = dry_run(capsys, *argv)["schedule"]
    assert (s["steps"], s["warmup_steps"], s["lr"][0], s["batch_size"], s["eval_every"]) == schedule


# -----------------------------------------------------------------------------
# The demo's recipe, the curves


def test_recipe_flags_left_open_take_the_released_or_the_demo_recipe(tmp_path):
    """The paper's datasets keep the released recipe; the synthetic demo gets its own (LP-FT, AdamW, the whole
    film without flips, no drop-path); a flag given on the command line wins over either."""
    resolve = lambda *argv: recipes.fill_finetuning(  # noqa: E731
        finetune.FinetuneConfig(**vars(finetune.build_parser().parse_args(list(argv)))))
    released, demo = resolve("--dataset", "nih"), resolve()
    pick = lambda c: (c.optimizer, c.head_init, c.min_crop, c.hflip, c.drop_path)  # noqa: E731
    assert pick(released) == ("sgd", "zero", 0.08, True, 0.1)
    assert pick(demo) == ("adamw", "probe", 1.0, False, 0.0)
    assert pick(resolve("--hflip", "--min_crop", "0.5", "--drop_path", "0.2")) == ("adamw", "probe", 0.5, True, 0.2)
    assert pick(resolve("--train_list", "my.txt")) == pick(released)  # files named: not the built-in demo
    siim = resolve("--task", "segment", "--dataset", "siim")
    assert (siim.optimizer, siim.hflip, siim.layer_decay, siim.drop_path) == ("adamw", True, 0.65, 0.1)
    with pytest.raises(ConfigError, match="for classification"):
        resolve("--task", "segment", "--optimizer", "sgd")


def test_training_loss_lines_and_curves_png(tmp_path):
    """log.jsonl gets the mean training loss every 10 steps besides the validations, and curves.png is
    drawn from it at each validation."""
    results = finetune.finetune(small_config(tmp_path, steps=20, eval_every=20))
    log = [json.loads(line) for line in open(tmp_path / "ft" / "lr_0.1" / "log.jsonl")]
    assert [(r["step"], "val_auc_mean" in r) for r in log] == [(10, False), (20, False), (20, True)]
    assert all(math.isfinite(r["train_loss"]) for r in log)
    curves_png = Image.open(tmp_path / "ft" / "curves.png")
    assert curves_png.size == (760, 286) and results["best_step"] == 20


def test_random_encoder_probe_is_the_seeds(tmp_path):
    """The scratch reference printed beside the demo: a probe of the seed's random encoder, the same twice."""
    cfg = recipes.fill_finetuning(small_config(tmp_path, num_records=48, num_val=24, num_test=24))
    sizes = MRMConfig.from_preset("tiny")
    splits, _ = finetune_data.build_splits(cfg, 64)
    first = finetune.random_encoder_probe(cfg, splits, sizes, 64, torch.device("cpu"), None)
    assert 0 <= first <= 1 and first == finetune.random_encoder_probe(cfg, splits, sizes, 64, torch.device("cpu"), None)


def test_help_says_where_each_open_default_comes_from(capsys):
    """--help: no flag shows "(default: None)" or an empty default, and every flag has its own description."""
    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: )" not in text
    helps = {a.dest: a.help for a in finetune.build_parser()._actions[1:]}  # [0] is --help
    assert helps["drop_path"].endswith("(default: released 0.1, synthetic demo 0.0)")  # from RECIPES
    assert all(not h.startswith("(default") for h in helps.values()), helps
