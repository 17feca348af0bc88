"""prepare.py, one subcommand at a time: synthetic records as files, shrunk copies, MIMIC-CXR's training.csv,
SIIM-ACR's masks from run lengths; and every subcommand's --help."""
import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import prepare
from machinery import errors, synthetic


# -----------------------------------------------------------------------------
# every subcommand's --help


@pytest.mark.parametrize("command", ["synth", "resize", "mimic", "siim-masks"])
def test_every_command_says_what_it_reads_and_writes_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        prepare.main([command, "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and "reads:" in text and "writes:" in text
    assert f"example: python prepare.py {command} " in text


# -----------------------------------------------------------------------------
# synth


def test_synth_writes_records_in_the_real_formats(tmp_path):
    prepare.main(["synth", "--out", str(tmp_path), "--n", "20", "--size", "96"])
    rows = list(csv.DictReader(open(tmp_path / "training.csv")))
    assert len(rows) == 16 and rows[3]["report_content"] == synthetic.synth_report(3)
    images, reports, bad = data.read_training_csv(tmp_path / "training.csv", tmp_path)
    assert len(images) == 16 and bad == 0
    assert np.array_equal(np.asarray(images.load(3)), synthetic.synth_record(3, 96)["image"])
    for i in range(20):  # some records have overlapping findings: every bit survives
        bits, masks = np.asarray(Image.open(tmp_path / "masks" / f"{i:05d}.png")), synthetic.synth_record(i, 96)["masks"]
        for k in range(len(synthetic.FINDINGS)):
            assert np.array_equal((bits >> k) & 1, masks[k].astype(np.uint8))
    test = (tmp_path / "test_list.txt").read_text().splitlines()
    assert len(test) == 2 and test[0].split()[0] == "images/00018.png"
    assert [float(v) for v in test[0].split()[1:]] == synthetic.synth_record(18, 96)["labels"].tolist()
    assert len((tmp_path / "train_10.txt").read_text().splitlines()) == 1


# -----------------------------------------------------------------------------
# resize


def test_resize_shrinks_skips_done_files_and_reports_bad_ones(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    Image.fromarray(np.full((400, 300), 3000, dtype=np.uint16)).save(src / "a" / "deep.png")
    Image.new("L", (100, 80)).save(src / "small.jpg")
    (src / "bad.jpg").write_bytes(b"junk")
    errors = prepare.resize_dataset(src, tmp_path / "dst", size=150, workers=1)
    assert len(errors) == 1 and "bad.jpg" in errors[0]
    deep = Image.open(tmp_path / "dst" / "a" / "deep.png")
    assert deep.mode == "L" and deep.size == (150, 200)
    assert Image.open(tmp_path / "dst" / "small.jpg").size == (100, 80)  # never enlarged
    assert not list((tmp_path / "dst").rglob("*.tmp"))
    (tmp_path / "dst" / "small.jpg").write_bytes(b"done")
    assert len(prepare.resize_dataset(src, tmp_path / "dst", size=150, workers=1)) == 1  # only the bad one again
    assert (tmp_path / "dst" / "small.jpg").read_bytes() == b"done"  # files already there are left alone


def test_resize_refuses_a_source_without_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        prepare.resize_dataset(tmp_path / "nowhere", tmp_path / "dst")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"notes: no images under it \(.bmp, .dcm, .jpeg, .jpg"):
        prepare.resize_dataset(tmp_path / "notes", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


# -----------------------------------------------------------------------------
# mimic


MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough

 FINDINGS:
 The lungs are clear.  No pleural effusion
 or pneumothorax.

 IMPRESSION:  No acute cardiopulmonary process.
"""


def mimic_tree(tmp_path):
    """Three studies: a PA + a lateral image with MIMIC_REPORT, an AP image whose report has only an
    INDICATION, an AP image whose report has only FINDINGS; and the metadata listing the four views."""
    study = Path("files/p10/p10000032/s50414267")
    (tmp_path / "jpg" / study).mkdir(parents=True)
    for name in ("front", "side"):
        Image.new("L", (8, 8)).save(tmp_path / "jpg" / study / f"{name}.jpg")
    (tmp_path / "reports" / study.parent).mkdir(parents=True)
    (tmp_path / "reports" / study.parent / "s50414267.txt").write_text(MIMIC_REPORT)
    other = Path("files/p10/p10000032/s50000001")  # a report with neither section
    (tmp_path / "jpg" / other).mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "jpg" / other / "x.jpg")
    (tmp_path / "reports" / other.parent / "s50000001.txt").write_text("INDICATION: pain.")
    ap = Path("files/p10/p10000032/s50000002")  # an AP view with a report
    (tmp_path / "jpg" / ap).mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "jpg" / ap / "y.jpg")
    (tmp_path / "reports" / ap.parent / "s50000002.txt").write_text("FINDINGS: Clear.")
    with gzip.open(tmp_path / "meta.csv.gz", "wt") as f:
        f.write("dicom_id,subject_id,study_id,ViewPosition\nfront,10000032,50414267,PA\n"
                "side,10000032,50414267,LATERAL\nx,10000032,50000001,AP\ny,10000032,50000002,AP\n")
    return study, other, ap


WHOLE = ("FINAL REPORT EXAMINATION: CHEST (PA AND LAT) INDICATION: ___ with cough FINDINGS: The lungs are clear. "
         "No pleural effusion or pneumothorax. IMPRESSION: No acute cardiopulmonary process.")


def test_mimic_converter_takes_every_view_and_the_whole_report(tmp_path):
    study, other, ap = mimic_tree(tmp_path)
    out = tmp_path / "training.csv"
    prepare.main(["mimic", "--reports", str(tmp_path / "reports"), "--images", str(tmp_path / "jpg"),
                  "--metadata", str(tmp_path / "meta.csv.gz"), "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert rows == [{"image_path": f"{study.as_posix()}/front.jpg", "report_content": WHOLE},
                    {"image_path": f"{study.as_posix()}/side.jpg", "report_content": WHOLE},
                    {"image_path": f"{other.as_posix()}/x.jpg", "report_content": "INDICATION: pain."},
                    {"image_path": f"{ap.as_posix()}/y.jpg", "report_content": "FINDINGS: Clear."}]
    assert prepare.convert_mimic(tmp_path / "reports", tmp_path / "jpg", out) == 4  # no metadata: every image found
    with pytest.raises(errors.ConfigError, match="--views needs --metadata"):
        prepare.convert_mimic(tmp_path / "reports", tmp_path / "jpg", out, views=["PA"])


def test_mimic_converter_names_what_is_missing_and_writes_no_empty_csv(tmp_path):
    study, other, ap = mimic_tree(tmp_path)
    reports, images, out = tmp_path / "reports", tmp_path / "jpg", tmp_path / "training.csv"
    with pytest.raises(FileNotFoundError, match="nowhere: no such reports folder"):
        prepare.convert_mimic(tmp_path / "nowhere", images, out)
    with pytest.raises(FileNotFoundError, match="nowhere: no such images folder"):
        prepare.convert_mimic(reports, tmp_path / "nowhere", out)
    with pytest.raises(FileNotFoundError, match="meta.csv: no such metadata file"):
        prepare.convert_mimic(reports, images, out, metadata=tmp_path / "meta.csv")
    (tmp_path / "no_reports").mkdir()  # every image found, none with a report file: nothing to train on
    with pytest.raises(data.BadRecord, match=r"training.csv was not written: of 4 images found, skipped 0 "
                                             r"missing images, 4 without a report file"):
        prepare.convert_mimic(tmp_path / "no_reports", images, out)
    assert not out.exists()


def test_mimic_converter_keeps_findings_impression_and_frontal_views_when_asked(tmp_path):
    study, other, ap = mimic_tree(tmp_path)
    out = tmp_path / "training.csv"
    prepare.main(["mimic", "--reports", str(tmp_path / "reports"), "--images", str(tmp_path / "jpg"),
                  "--metadata", str(tmp_path / "meta.csv.gz"), "--out", str(out), "--views", "PA,AP",
                  "--sections", "findings,impression"])
    rows = list(csv.DictReader(open(out)))
    assert rows == [{"image_path": f"{study.as_posix()}/front.jpg",
                     "report_content": "FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. "
                                       "IMPRESSION: No acute cardiopulmonary process."},
                    {"image_path": f"{ap.as_posix()}/y.jpg", "report_content": "FINDINGS: Clear."}]
    assert prepare.mimic_report_text("FINDINGS AND IMPRESSION: Clear.\nNOTIFICATION: called.", ["findings"]) == \
        "FINDINGS AND IMPRESSION: Clear."


# -----------------------------------------------------------------------------
# siim-masks


def test_decode_rle_column_major_runs():
    # pixels numbered down the columns of a 3 x 3 image; offsets count from the previous run's end
    m = prepare.decode_rle("1 2 3 1", 3, 3)  # pixels 1, 2 and 6
    assert m.astype(int).tolist() == [[0, 0, 1], [1, 0, 0], [1, 0, 0]]
    assert not prepare.decode_rle("-1", 3, 3).any()
    with pytest.raises(ValueError, match="outside"):
        prepare.decode_rle("8 2", 3, 3)
    with pytest.raises(ValueError, match="odd"):
        prepare.decode_rle("1 2 3", 3, 3)


def test_siim_masks_union_rows(tmp_path):
    csv = tmp_path / "train-rle.csv"
    csv.write_text("ImageId, EncodedPixels\n"
                   "a, 0 2\n"        # first region of a: pixels 0, 1 (column 0, rows 0-1)
                   "b, -1\n"
                   "a, 12 4\n")      # second region of a: pixels 12..15 (column 3)
    assert prepare.write_siim_masks(csv, tmp_path / "masks", size=4) == 2
    a = np.asarray(Image.open(tmp_path / "masks" / "a.png"))
    expected = np.zeros((4, 4), np.uint8)
    expected[0:2, 0] = 255
    expected[:, 3] = 255
    assert (a == expected).all()
    assert not np.asarray(Image.open(tmp_path / "masks" / "b.png")).any()
    csv.write_text("ImageId, EncodedPixels\na, 0 2\nc, 99 1\n")
    with pytest.raises(data.BadRecord, match="line 3"):
        prepare.write_siim_masks(csv, tmp_path / "masks", size=4)
    csv.write_text("id,rle\na, 0 2\n")
    with pytest.raises(data.BadRecord, match="header"):
        prepare.write_siim_masks(csv, tmp_path / "masks", size=4)
