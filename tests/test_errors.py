"""What a user meets when the input is wrong: a checkpoint that would run code is refused by every entry
point before any of it runs, a file that is not UTF-8 is refused naming its line, and the scripts print
expected errors as one line `SCRIPT: error: ...` with exit status 2, never a traceback."""
import argparse
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import finetune
import finetune_data
import train
from machinery.checkpoints import CheckpointError, load_pretrained, read_checkpoint
from machinery.run import Run
from mrm import ViT

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--num_records", "16", "--batch_size", "4", "--epochs", "1", "--num_workers", "0", "--fusion_check", "0"]


class RunsACommand:
    """Pickles as a call of os.system: what a booby-trapped checkpoint does as it is loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def trap(tmp_path):
    """(checkpoint, marker): loading the checkpoint the unsafe way creates the marker file."""
    marker, path = tmp_path / "it_ran", tmp_path / "trap.pth"
    torch.save({"model": ViT(32, 8, 3, 64, 1, 4).state_dict(), "args": RunsACommand(marker)}, path)
    return path, marker


def test_the_trap_is_real(trap):
    path, marker = trap
    torch.load(path, weights_only=False)  # what an unsafe loader does: the command runs
    assert marker.exists()


def test_load_pretrained_refuses_a_checkpoint_that_runs_code(trap):
    path, marker = trap
    with pytest.raises(CheckpointError, match=r"trap.pth: refused: it pickles \w+\.system, .*--trust_checkpoint"):
        load_pretrained(ViT(32, 8, 3, 64, 1, 4), path)
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["--init", "{trap}", *SMALL], ["--resume", "{trap}"]])
def test_train_refuses_it_in_one_line(trap, tmp_path, argv, capsys):
    path, marker = trap
    with pytest.raises(SystemExit) as e:
        train.main([a.format(trap=path) for a in argv] + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("train.py: error: ") and "trap.pth: refused" in err
    assert err.count("\n") == 1 and not marker.exists()


@pytest.mark.parametrize("resume", [False, True])
def test_finetune_refuses_it_in_one_line(trap, tmp_path, resume, capsys):
    path, marker = trap
    argv = ["--init", str(path), "--num_records", "16", "--steps", "2", "--num_workers", "0",
            "--out", str(tmp_path / "ft")]
    if resume:  # a last.pt of a fine-tuning run, swapped for the trap
        (tmp_path / "ft" / "lr_0.1").mkdir(parents=True)
        os.replace(path, tmp_path / "ft" / "lr_0.1" / "last.pt")
        argv = [*argv[2:], "--init", "none", "--resume", "--lr", "0.1"]
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("finetune.py: error: ") and ".pt" in err and "refused" in err
    assert not marker.exists()


def test_namespace_and_numpy_scalars_load_safely(tmp_path, capsys):
    # what MAE's and the released MRM's training checkpoints pickle beside the weights
    vit = ViT(32, 8, 3, 64, 1, 4)
    path = tmp_path / "checkpoint-199.pth"
    torch.save({"model": vit.state_dict(), "args": argparse.Namespace(lr=1.5e-4, model="mrm"),
                "best": np.float64(0.5), "epoch": np.int64(199)}, path)
    ckpt = read_checkpoint(path)
    assert ckpt["args"].model == "mrm" and ckpt["best"] == 0.5 and ckpt["epoch"] == 199
    assert load_pretrained(ViT(32, 8, 3, 64, 1, 4), path, verbose=False)["missing"] == []
    said = capsys.readouterr()
    assert said.out == "" and said.err == ""


def test_the_opt_in_loads_a_trusted_file(tmp_path, capsys):
    vit = ViT(64, 8, 3, 192, 6, 3)  # the tiny preset's encoder
    path = tmp_path / "trusted.pth"
    torch.save({"model": vit.state_dict(), "output_dir": pathlib.PurePosixPath("runs/a")}, path)
    with pytest.raises(CheckpointError, match="pickles pathlib.PurePosixPath"):
        read_checkpoint(path)
    assert read_checkpoint(path, trust=True)["output_dir"] == pathlib.PurePosixPath("runs/a")
    assert "weights_only=False (trusted" in capsys.readouterr().out
    assert load_pretrained(ViT(64, 8, 3, 192, 6, 3), path, verbose=False, trust=True)["missing"] == []
    out = tmp_path / "run"
    train.main(["--init", str(path), "--trust_checkpoint", *SMALL, "--out", str(out)])
    assert (out / "ckpt.pt").exists()


def test_train_resume_with_trust(tmp_path, trap):
    # --trust_checkpoint may be given when resuming; the refused file above then loads (and would run)
    path, marker = trap
    with pytest.raises(ValueError, match="not a train.py checkpoint"):  # it holds weights only
        train.resolve(["--resume", str(path), "--trust_checkpoint"], Run("train.py"))
    assert marker.exists()


# ----------------------------------------------------------------------------- text files that are not UTF-8


def test_training_csv_that_is_not_utf8(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    csv_path = tmp_path / "training.csv"
    csv_path.write_bytes(b"image_path,report_content\na.png,Small effusion.\na.png,Caf\xe9 sign.\n")
    with pytest.raises(data.BadRecord, match=r"training.csv, line 3: byte 0xe9 at column 10 is not UTF-8; "
                                             r"re-save the file as UTF-8"):
        data.read_training_csv(csv_path, tmp_path)


def test_byte_order_mark_is_not_a_column_name(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    csv_path = tmp_path / "training.csv"
    csv_path.write_bytes("\ufeffimage_path,report_content\r\na.png,\"Two\r\nlines.\"\r\n".encode("utf-8"))
    images, reports, bad = data.read_training_csv(csv_path, tmp_path)
    assert reports == ["Two\nlines."] and bad == 0 and images.where(0).endswith("line 2")  # line ends read as \\n


def test_split_list_that_is_not_utf8(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "train_1.txt"
    path.write_bytes(b"a.png 0 1\n\xff.png 1 0\n")
    with pytest.raises(data.BadRecord, match=r"train_1.txt, line 2: byte 0xff at column 1 is not UTF-8"):
        finetune_data.read_split_list(str(path), str(tmp_path))
    with pytest.raises(data.BadRecord, match=r"train_1.txt, line 2: byte 0xff"):
        finetune_data.read_id_list(str(path), str(tmp_path), str(tmp_path))


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv, says", [
    (["train.py", "--resume", "missing.pt"], "train.py: error: missing.pt: no such checkpoint file"),
    (["train.py", "--data", "missing.csv"], "train.py: error: missing.csv: no such CSV file"),
    (["finetune.py", "--dataset", "nih", "--train_list", "a.txt"], "finetune.py: error: give --val_list"),
    (["prepare.py", "siim-masks", "--rle", "missing.csv", "--out", "m"],
     "prepare.py: error: missing.csv: no such run-length CSV file"),
    (["prepare.py", "resize", "--src", "nowhere", "--dst", "out"], "prepare.py: error: nowhere: no such folder"),
    (["prepare.py", "mimic", "--reports", "nowhere", "--images", "."],
     "prepare.py: error: nowhere: no such reports folder"),
    (["prepare.py", "synth", "--n", "0", "--out", "s"], "prepare.py synth: error: argument --n: 0 is outside [1, inf]"),
    (["prepare.py", "mimic"], "prepare.py mimic: error: the following arguments are required: --reports, --images"),
    (["bench.py", "data", "--image", "missing.png", "--n", "1", "--rounds", "1"], "bench.py: error: "),
])
def test_scripts_print_expected_errors_as_one_line(tmp_path, argv, says):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(says) and done.stderr.count("\n") == 1, done.stderr
