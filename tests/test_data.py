"""data.py and the records it reads: synthetic records (synthetic.py), image loading, CSV checks, tokenizer, report
masking, augmentation. The tools that prepare records (prepare.py) are tested in test_prepare.py."""
import csv
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from machinery import images, synthetic, tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def needs_shared(name):
    if not (SHARED / name).exists():
        pytest.skip(f"../shared/data/{name} is not here")
    return SHARED / name


# -----------------------------------------------------------------------------
# synthetic records


def test_synthetic_records_are_deterministic_and_distinct():
    a, b = synthetic.synth_record(3, 128), synthetic.synth_record(3, 128)
    for k in ("image", "labels", "masks"):
        assert np.array_equal(a[k], b[k])
    assert a["report"] == b["report"]
    assert a["report"] == synthetic.write_report(synthetic.synth_case(3), np.random.default_rng([0, 3, 1]))  # own stream
    c = synthetic.synth_record(4, 128)
    assert not np.array_equal(a["image"], c["image"]) and a["report"] != c["report"]
    assert synthetic.synth_record(3, 128, seed=1)["report"] != a["report"] or \
        not np.array_equal(synthetic.synth_record(3, 128, seed=1)["image"], a["image"])
    assert a["image"].dtype == np.uint8 and a["image"].shape == (128, 128)
    assert a["masks"].shape == (len(synthetic.FINDINGS), 128, 128) and a["labels"].shape == (len(synthetic.FINDINGS),)


def test_synthetic_reports_masks_and_labels_agree_with_the_image():
    present = {name: 0 for name in synthetic.FINDINGS}
    for i in range(120):
        case, rec = synthetic.synth_case(i), synthetic.synth_record(i, 192)
        report = rec["report"]
        assert report.startswith("FINDINGS: ") and " IMPRESSION: " in report
        for k, name in enumerate(synthetic.FINDINGS):
            f = case["findings"].get(name)
            assert rec["labels"][k] == (f is not None)
            assert rec["masks"][k].any() == (f is not None), (i, name)
            if f is None:
                continue
            present[name] += 1
            if "side" in f:  # PA view: the patient's right is on the image's left
                cols = np.nonzero(rec["masks"][k])[1]
                assert (cols.mean() < 96) == (f["side"] == "right"), (i, name)
                assert f["side"] in report
            if "size" in f:
                assert f["size"] in report.lower()
            if "mm" in f:
                assert f"{f['mm']} mm" in report
        if "pneumothorax" not in case["findings"]:
            assert "large right pneumothorax" not in report.lower() and "small left pneumothorax" not in report.lower()
        for name, denials in [("pneumothorax", ["no pneumothorax", "no evidence of pneumothorax"]),
                              ("pleural effusion", ["no pleural effusion", "no effusion"])]:
            if name in case["findings"]:  # a present finding is never denied
                assert not any(d in report.lower() for d in denials), (i, name)
        if not case["findings"]:
            assert rec["masks"].sum() == 0
    assert all(n >= 10 for n in present.values()), present  # every finding occurs


def test_report_words_that_name_side_and_size_change_only_with_the_image():
    case = synthetic.synth_case(0)
    case["findings"] = {"pleural effusion": {"side": "left", "size": "small", "where": [0, 0, 0]}}
    flipped = {"anatomy": case["anatomy"], "findings": {"pleural effusion": {**case["findings"]["pleural effusion"],
                                                                             "side": "right"}}}
    bigger = {"anatomy": case["anatomy"], "findings": {"pleural effusion": {**case["findings"]["pleural effusion"],
                                                                            "size": "large"}}}
    k = synthetic.FINDINGS.index("pleural effusion")
    texts, images, masks = [], [], []
    for c in (case, flipped, bigger):
        texts.append(synthetic.write_report(c, np.random.default_rng(7)))  # the same phrasing stream
        img, m = synthetic.render_case(c, 192, np.random.default_rng(7))
        images.append(img), masks.append(m[k])
    assert texts[1] == texts[0].replace("left", "right") != texts[0]
    assert texts[2] == texts[0].replace("small", "large").replace("Small", "Large") != texts[0]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    assert np.nonzero(masks[0])[1].mean() > 96 > np.nonzero(masks[1])[1].mean()  # left is on the image's right
    assert masks[2].sum() > 2 * masks[0].sum()


def test_zone_moves_a_finding_down_the_lung():
    anatomy, k = synthetic.synth_case(0)["anatomy"], synthetic.FINDINGS.index("nodule")
    rows = []
    for zone in ("upper", "middle", "lower"):
        case = {"anatomy": anatomy, "findings": {"nodule": {"side": "right", "zone": zone, "mm": 20, "where": [0, 0, 0]}}}
        rows.append(np.nonzero(synthetic.render_case(case, 192, np.random.default_rng(0))[1][k])[0].mean())
    assert rows[0] < rows[1] < rows[2]


def test_cardiomegaly_is_a_wider_heart():
    cases = [synthetic.synth_case(i) for i in range(60)]
    normal = [c["anatomy"]["ctr"] for c in cases if "cardiomegaly" not in c["findings"]]
    big = [c["anatomy"]["ctr"] for c in cases if "cardiomegaly" in c["findings"]]
    assert big and max(normal) < 0.5 < min(big)


# -----------------------------------------------------------------------------
# images


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "1", "I;16", "I", "F"])
def test_every_image_mode_becomes_8_bit_gray(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 1, 40), (30, 1))
    if mode == "I;16":
        img = Image.fromarray((ramp * 4095).astype(np.uint16))  # 12-bit data in a 16-bit file
    elif mode in ("I", "F"):
        img = Image.fromarray((ramp * 1000 - 200).astype(np.int32 if mode == "I" else np.float32))
    else:
        img = Image.fromarray((ramp * 255).astype(np.uint8)).convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("I", "F") else "x.png")
    img.save(path)
    out = images.load_image(path)
    assert out.mode == "L" and out.size == (40, 30)
    a = np.asarray(out).astype(int)
    if mode != "1":  # a ramp stays a ramp, over the full 8-bit range for deep images (no clipping at 255)
        assert a[:, 0].max() <= 3 and a[:, -1].min() >= 250 and (np.diff(a[0]) >= 0).all()


def test_16_bit_film_matches_its_8_bit_rendering():
    film16 = np.asarray(images.load_image(needs_shared("cxr_pa_real_16bit.png"))).astype(float)
    film8 = np.asarray(images.load_image(SHARED / "cxr_pa_real.jpg")).astype(float)
    assert film16.shape == film8.shape and np.abs(film16 - film8).mean() < 2


def test_real_covid_films_in_every_format_load():
    folder = needs_shared("covid19/images")
    files = sorted(folder.iterdir())[::8]
    for f in files:
        img = images.load_image(f)
        assert img.mode == "L" and min(img.size) > 100


def test_corrupt_truncated_and_missing_images_are_named(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    full = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    for name, words in [("junk.png", "cannot read image .not a format PIL knows"), ("cut.jpg", "cannot read image"),
                        ("gone.png", "no such image file")]:
        for load in (images.load_image, lambda path: data.load_crop(path, 64, np.random.default_rng(0))):
            with pytest.raises(data.BadRecord, match=words) as e:
                load(tmp_path / name)
            assert name in str(e.value) and "BytesIO" not in str(e.value)  # the file, not the memory PIL read


def test_dicom_needs_pydicom_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "film.img"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # recognised by its preamble, not its name
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if not installed
    with pytest.raises(data.BadRecord, match="pip install pydicom") as e:
        images.load_image(path)
    assert "film.img" in str(e.value)


def test_dicom_monochrome1_is_inverted_and_rescaled(tmp_path, monkeypatch):
    pixels = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    tags = dict(PhotometricInterpretation="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-100)

    def dcmread(f):
        assert f.read() == b"a DICOM file"  # the bytes already read, not the file opened again
        return types.SimpleNamespace(pixel_array=pixels, **tags)

    fake = types.ModuleType("pydicom")
    fake.dcmread = dcmread
    monkeypatch.setitem(sys.modules, "pydicom", fake)
    (tmp_path / "a.dcm").write_bytes(b"a DICOM file")
    out = np.asarray(images.load_image(tmp_path / "a.dcm"))
    assert out.tolist() == [[255, 191], [127, 0]]  # stretched 0..255, then 0 = white turned over
    tags = {}  # no tag: MONOCHROME2, as is
    assert np.asarray(images.load_image(tmp_path / "a.dcm")).tolist() == [[0, 64], [128, 255]]


# -----------------------------------------------------------------------------
# training.csv


def write_csv(path, rows, header=("image_path", "report_content")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_training_csv_rows_and_line_numbers(tmp_path):
    for n in range(3):
        Image.new("L", (8, 8)).save(tmp_path / f"{n}.png")
    write_csv(tmp_path / "t.csv", [("0.png", "FINDINGS: two\nlines."), ("1.png", "x"), ("2.png", "  ")])
    with pytest.raises(data.BadRecord, match=r"t.csv, line 5: empty report for 2.png"):
        data.read_training_csv(tmp_path / "t.csv", tmp_path)  # the quoted report spans lines 2-3
    images, reports, bad = data.read_training_csv(tmp_path / "t.csv", tmp_path, skip_bad=True)
    assert reports == ["FINDINGS: two\nlines.", "x"] and bad == 1 and len(images) == 2
    assert images.where(1).endswith("line 4") and images.where(0).endswith("line 2")


def test_training_csv_blank_lines_and_byte_order_mark(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("\ufeffimage_path,report_content\na.png,ok\n\n\nb.png,ok\n", encoding="utf-8")
    with pytest.raises(data.BadRecord, match=r"t.csv, line 5: image .*b.png does not exist"):
        data.read_training_csv(tmp_path / "t.csv", tmp_path)


def test_training_csv_names_missing_files_and_columns(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    write_csv(tmp_path / "t.csv", [("a.png", "ok"), ("missing.png", "ok")])
    with pytest.raises(data.BadRecord, match=r"line 3: image .*missing.png does not exist"):
        data.read_training_csv(tmp_path / "t.csv", tmp_path)
    write_csv(tmp_path / "cols.csv", [("a.png", "ok")], header=("path", "text"))
    with pytest.raises(data.BadRecord, match=r"cols.csv: needs the columns image_path,report_content"):
        data.read_training_csv(tmp_path / "cols.csv", tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.csv: no such CSV file"):
        data.read_training_csv(tmp_path / "nope.csv", tmp_path)
    write_csv(tmp_path / "none.csv", [("gone.png", "x")])
    with pytest.raises(data.BadRecord, match="none.csv: no usable rows"):
        data.read_training_csv(tmp_path / "none.csv", tmp_path, skip_bad=True)


# -----------------------------------------------------------------------------
# tokenizer and report masking


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_tokenizer([synthetic.synth_report(i) for i in range(200)], vocab_size=2000)


def test_trained_tokenizer_matches_the_released_layout(tok, tmp_path):
    assert [tok.token_to_id(t) for t in tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3]
    ids = data.encode_reports(tok, ["Small LEFT pleural effusion.", ""], max_len=10)
    assert ids.shape == (2, 10) and ids.dtype == np.int32
    assert ids[0, 0] == 2 and [tok.id_to_token(int(i)) for i in ids[0, 1:6]] == ["small", "left", "pleural",
                                                                              "effusion", "."]
    assert (ids[0, 6:] == 0).all() and ids[1].tolist() == [2] + [0] * 9
    long = data.encode_reports(tok, ["no effusion . " * 50], max_len=100)
    assert (long != 0).all()  # truncated to exactly 100
    tok.save(str(tmp_path / "t.json"))
    assert tokenizer.load_tokenizer(tmp_path / "t.json").encode("normal heart size").ids == \
        tok.encode("normal heart size").ids


def test_tokenizer_training_is_deterministic_and_covers_every_character(tok):
    again = tokenizer.train_tokenizer([synthetic.synth_report(i) for i in range(200)], vocab_size=2000)
    assert again.to_str() == tok.to_str()
    small = tokenizer.train_tokenizer(["aa bb bb cc cc cc"], vocab_size=4 + 6 + 2)  # room for two words
    assert [t for t, _ in sorted(small.get_vocab().items(), key=lambda kv: kv[1])][4:] == \
        ["a", "b", "c", "##a", "##b", "##c", "cc", "bb"]  # characters, then words by frequency
    assert small.encode("aa cc").tokens == ["a", "##a", "cc"]  # a word left out is spelled, not [UNK]
    tie = tokenizer.train_tokenizer(["bb aa"], vocab_size=4 + 4 + 1)  # room for one of two equally common words
    assert tie.token_to_id("aa") == 8 and tie.token_to_id("bb") is None


def test_encoding_adds_cls_itself_whatever_the_tokenizer_file_says(tok):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    bert_like = Tokenizer.from_str(tok.to_str())  # e.g. a JSON file with BERT's "[CLS] $A [SEP]" template
    bert_like.post_processor = TemplateProcessing(single="[CLS] $A [MASK]", special_tokens=[("[CLS]", 2), ("[MASK]", 3)])
    assert np.array_equal(data.encode_reports(bert_like, ["no effusion ."]), data.encode_reports(tok, ["no effusion ."]))


def test_released_mimic_tokenizer_loads():
    t = tokenizer.load_tokenizer(needs_shared("mimic_wordpiece.json"))
    assert t.get_vocab_size() == 30000 and [t.token_to_id(s) for s in tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3]
    ids = data.encode_reports(t, ["Small left pleural effusion. No pneumothorax."])
    assert ids[0, :9].tolist() == [2, 418, 247, 221, 203, 16, 152, 258, 16]


def test_bert_vocab_txt_and_bad_tokenizer_files(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[MASK]", "no", "effusion", "eff", "##usion", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    t = tokenizer.load_tokenizer(tmp_path / "vocab.txt")
    assert t.encode("No effusion.").tokens == ["no", "effusion", "."]
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"bad.txt: the tokenizer lacks the special tokens"):
        tokenizer.load_tokenizer(tmp_path / "bad.txt")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="junk.json: not a tokenizer file"):
        tokenizer.load_tokenizer(tmp_path / "junk.json")


def test_report_masking_statistics(tok):
    ids = data.encode_reports(tok, [synthetic.synth_report(i) for i in range(300)])
    rng = np.random.default_rng(0)
    masked = real = 0
    for row in ids:
        tokens, labels = data.mask_report(row, 0.5, rng, mask_id=3, pad_id=0)
        chosen = labels != -100
        assert chosen.sum() >= 1 and not chosen[0] and not chosen[row == 0].any()  # never [CLS] or [PAD]
        assert (tokens[chosen] == 3).all() and (labels[chosen] == row[chosen]).all()
        assert (tokens[~chosen] == row[~chosen]).all()
        masked, real = masked + chosen.sum(), real + (row[1:] != 0).sum()
    assert abs(masked / real - 0.5) < 0.02
    one = np.array([2, 17, 0, 0])
    for seed in range(20):  # a one-word report always has its word masked
        assert data.mask_report(one, 0.5, np.random.default_rng(seed), 3, 0)[1].tolist() == [-100, 17, -100, -100]
    with pytest.raises(data.BadRecord):
        data.mask_report(np.array([2, 0, 0]), 0.5, rng, 3, 0)


# -----------------------------------------------------------------------------
# augmentation and the Dataset


def test_random_resized_crop_box_follows_the_recipe():
    rng = np.random.default_rng(0)
    for _ in range(500):
        x0, y0, x1, y1 = data.random_resized_crop_box(300, 200, rng)
        w, h = x1 - x0, y1 - y0
        assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200
        assert 0.2 * 0.97 <= w * h / 60000 <= 1.0 and 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    boxes = np.array([data.random_resized_crop_box(1000, 1000, rng) for _ in range(4000)])
    aspect = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
    assert abs((aspect > 1).mean() - 0.5) < 0.03  # log-uniform aspect: as many wide as tall
    small = np.array([data.random_resized_crop_box(10, 10, rng) for _ in range(500)])
    assert ((small[:, 2] == 10) & (small[:, 0] > 0)).any() and ((small[:, 3] == 10) & (small[:, 1] > 0)).any()
    # a strip too thin for any try: the centre crop of the clamped aspect
    assert data.random_resized_crop_box(1000, 10, np.random.default_rng(0)) == (493, 0, 506, 10)


def test_augment_is_a_crop_or_its_mirror():
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)))  # dark left, bright right
    flips = 0
    for seed in range(40):
        out = data.augment(img, 32, np.random.default_rng(seed))
        unflipped = data.augment(img, 32, np.random.default_rng(seed), hflip=False)  # the same crop
        assert out.shape == (32, 32) and out.dtype == np.uint8
        assert unflipped[:, 0].mean() < unflipped[:, -1].mean()
        flipped = not np.array_equal(out, unflipped)
        assert np.array_equal(out, unflipped[:, ::-1] if flipped else unflipped)
        flips += flipped
    assert 10 < flips < 30


def test_resize_box_is_torch_bicubic_on_the_gray_crop_exactly():
    """resize_box runs F.interpolate's two passes on 4 gray lines at a time (data.py): the same pixels as
    F.interpolate on the gray crop as one channel, for shrinking and enlarging, any box (odd heights,
    the last group of 4 rows past the image), the mirror, and a size that is no multiple of 4."""
    def plain(img, box, size):
        crop = torch.from_numpy(np.array(img.crop(box)))[None, None]
        return torch.nn.functional.interpolate(crop, (size, size), mode="bicubic", antialias=True)[0, 0].numpy()

    rng = np.random.default_rng(0)
    img = Image.fromarray(synthetic.synth_record(0, 300)["image"][:, :283])  # 300 rows, 283 columns
    boxes = [(0, 0, 283, 300), (0, 299, 283, 300), (282, 0, 283, 300), (5, 297, 280, 300), (0, 0, 64, 64)]
    for _ in range(40):
        x, y = int(rng.integers(0, 282)), int(rng.integers(0, 299))
        boxes.append((x, y, int(rng.integers(x + 1, 284)), int(rng.integers(y + 1, 301))))
    for k, box in enumerate(boxes):
        size = (64, 128, 448, 36)[k % 4]  # 36 < most boxes < 448; 36 is a multiple of 4, 30 (below) is not
        expected = plain(img, box, size)
        out = images.resize_box(img, box, size)
        assert out.shape == (size, size) and out.dtype == np.uint8 and out.flags.c_contiguous
        assert np.array_equal(out, expected)
        assert np.array_equal(images.resize_box(img, box, size, flip=True), expected[:, ::-1])
    assert np.array_equal(images.resize_box(img, (3, 4, 50, 61), 30, flip=True), plain(img, (3, 4, 50, 61), 30)[:, ::-1])


def test_pixels_reads_the_image_without_a_copy():
    """images.pixels: an 'L' image's own memory as a read-only array (Pillow's Arrow export), the same values
    as np.asarray; it stays valid after the image is closed; other modes and an image PIL keeps in pieces
    (over its 16 MB blocks) come as np.asarray's copy."""
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (300, 283), (1087, 1024)):
        # .copy(): memory of PIL's own (fromarray's image shares numpy's, and is copied: below)
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).copy()
        view = images.pixels(img)
        assert view.shape == (h, w) and view.dtype == np.uint8 and not view.flags.writeable
        assert np.array_equal(view, np.asarray(img))
    if not hasattr(img, "__arrow_c_array__"):
        pytest.skip("this Pillow has no Arrow export: pixels() copies, as np.asarray")
    img.putpixel((5, 7), 255 - int(view[7, 5]))  # PIL writes its own memory: the view sees it, a copy would not
    assert view[7, 5] == img.getpixel((5, 7))
    kept = view.copy()
    img.close()
    del img
    filler = [np.full(1 << 20, 7, np.uint8) for _ in range(20)]  # memory freed too early would be reused here
    assert np.array_equal(view, kept) and len(filler) == 20
    shared = rng.integers(0, 256, (10, 20), dtype=np.uint8)
    for img in (Image.new("RGB", (20, 10), (1, 2, 3)), Image.new("L", (4200, 4200), 9),  # 17.6 MB: in pieces
                Image.fromarray(shared)):  # Pillow 11.2-12.x crash on exporting it
        assert np.array_equal(images.pixels(img), np.asarray(img))


def test_resize_box_refuses_a_box_outside_the_image():
    img = Image.new("L", (50, 40))
    for box in ((0, 0, 51, 40), (-1, 0, 10, 10), (0, 30, 10, 41), (10, 10, 10, 20)):
        for size in (32, 30):  # either way through resize_box
            with pytest.raises(ValueError, match="not inside the 50 x 40 image"):
                images.resize_box(img, box, size)


def test_min_crop_bounds_the_crop_area():
    """min_crop=1 keeps the whole square film (resized, maybe mirrored); the released 0.2 often cuts it;
    PretrainDataset passes its min_crop on (train.py --min_crop)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    whole = data.full_view(img, 32)
    for seed in range(10):
        out = data.augment(img, 32, np.random.default_rng(seed), min_crop=1.0)
        assert np.array_equal(out, whole) or np.array_equal(out, whole[:, ::-1])
    cut = [data.augment(img, 32, np.random.default_rng(seed), hflip=False) for seed in range(10)]
    assert sum(not np.array_equal(c, whole) for c in cut) >= 9
    source = data.SyntheticImages(2, 64)
    tokens = np.array([[2, 10, 11, 12, 0]] * 2)
    kept = data.PretrainDataset(source, tokens, 32, 16, 0.5, 3, 0, hflip=False, min_crop=1.0)
    assert np.array_equal(kept[1]["image"][0].numpy(), data.full_view(source.load(1), 32))


def test_draft_scale_keeps_the_crop_at_least_the_output_size():
    assert images.draft_scale((0, 0, 895, 2000), 448) == 1  # 895 / 2 < 448
    assert images.draft_scale((10, 20, 906, 1010), 448) == 2  # 896 x 990
    assert images.draft_scale((0, 0, 1792, 1791), 448) == 2
    assert images.draft_scale((0, 0, 1792, 1792), 448) == 4
    assert images.draft_scale((0, 0, 4000, 3584), 448) == 8
    assert images.draft_scale((0, 0, 100, 100), 448) == 1  # a crop to enlarge: full decode


def test_jpeg_crops_decoded_at_draft_scale_match_the_full_decode(tmp_path):
    """load_crop decodes a JPEG at 1/2 or 1/4 scale when the crop allows, and takes the box to the nearest
    pixel of the reduced image: the same draws from rng as augment(load_image(...)), and pixels within a
    few gray levels of that nearest box cut from the full decode; exact for PNG and undrafted JPEG."""
    gray = synthetic.synth_record(0, 512)["image"]
    Image.fromarray(gray).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(gray).convert("RGB").save(tmp_path / "rgb.jpg", quality=95)  # decoded straight to gray
    Image.fromarray(gray).save(tmp_path / "a.png")
    drafted = 0
    for seed in range(8):
        box = data.random_resized_crop_box(512, 512, np.random.default_rng(seed))
        s = images.draft_scale(box, 128)
        for name in ("a.jpg", "rgb.jpg", "a.png"):
            rng_fast, rng_full = np.random.default_rng(seed), np.random.default_rng(seed)
            fast = data.load_crop(tmp_path / name, 128, rng_fast)
            full = data.augment(images.load_image(tmp_path / name), 128, rng_full)
            assert fast.shape == (128, 128) and fast.dtype == np.uint8
            assert rng_fast.random() == rng_full.random()  # the same draws: samples stay reproducible
            if name == "a.png" or s == 1:
                assert np.array_equal(fast, full)
                continue
            drafted += 1
            fast = data.load_crop(tmp_path / name, 128, np.random.default_rng(seed), hflip=False).astype(int)
            nearest = tuple(round(v / s) * s for v in box)  # the box load_crop resizes, in full-size pixels
            assert nearest != box and all(abs(u - v) <= s / 2 for u, v in zip(nearest, box))
            full = images.resize_box(images.load_image(tmp_path / name), nearest, 128).astype(int)
            diff = np.abs(fast - full)
            assert 0 < diff.mean() < 0.6 and diff.max() <= 8  # > 0: the reduced decode really ran
    assert drafted >= 8
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:5000])
    with pytest.raises(data.BadRecord, match=r"cut.jpg: cannot read image"):
        data.load_crop(tmp_path / "cut.jpg", 128, np.random.default_rng(0))


def test_real_film_crops_at_draft_scale_match_the_full_decode():
    film = needs_shared("cxr_pa_real.jpg")
    for seed in range(3):  # all at 1/2 scale on this 1841 x 1955 film; the box moves by up to a pixel
        fast = data.load_crop(film, 448, np.random.default_rng(seed)).astype(int)
        full = data.augment(images.load_image(film), 448, np.random.default_rng(seed)).astype(int)
        assert 0 < np.abs(fast - full).mean() < 1.0 and abs(fast.mean() - full.mean()) < 0.1


def make_dataset(images, tok, n_tokens=None, **kw):
    reports = [synthetic.synth_report(i) for i in range(len(images))]
    tokens = data.encode_reports(tok, reports)
    return data.PretrainDataset(images, tokens, crop_size=64, num_patches=16, text_mask_ratio=0.5, mask_id=3,
                                pad_id=0, **kw)


def test_dataset_samples_depend_on_seed_epoch_and_index_only(tok):
    ds = make_dataset(data.SyntheticImages(6, 96), tok)
    a, b = ds[2], ds[2]
    assert a["image"].shape == (1, 64, 64) and a["image"].dtype == torch.uint8
    assert a["tokens"].shape == (100,) and a["noise"].shape == (16,) and a["skipped"] == 0
    for k in ("image", "tokens", "labels", "noise"):
        assert torch.equal(a[k], b[k])
    ds.set_epoch(1)
    c = ds[2]
    assert not torch.equal(a["noise"], c["noise"]) and not torch.equal(a["labels"], c["labels"])


def test_dataset_skips_or_names_a_bad_image(tmp_path, tok):
    for n in range(3):
        Image.fromarray(synthetic.synth_record(n, 96)["image"]).save(tmp_path / f"{n}.png")
    write_csv(tmp_path / "t.csv", [(f"{n}.png", synthetic.synth_report(n)) for n in range(3)])
    images, reports, _ = data.read_training_csv(tmp_path / "t.csv", tmp_path)
    (tmp_path / "1.png").write_bytes(b"broken after the check")
    strict = make_dataset(images, tok)
    with pytest.raises(data.BadRecord, match=r"1.png: cannot read image .*t.csv, line 3"):
        strict[1]
    (tmp_path / "2.png").write_bytes(b"broken too")
    lenient = make_dataset(images, tok, skip_bad=True)
    sample = lenient[1]  # records 1 and 2 unreadable: the next readable one is record 0, with its report
    assert sample["skipped"] == 2 and sample["image"].shape == (1, 64, 64)
    original = torch.where(sample["labels"] != -100, sample["labels"], sample["tokens"])
    assert torch.equal(original, torch.from_numpy(lenient.tokens[0]).long())
