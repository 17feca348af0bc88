"""Faults a user meets, run the way users run them: every one ends in one line `SCRIPT: error: ...` (or
the interrupt's line) and nothing a run wrote earlier is lost or changed. Bad input read in DataLoader
worker processes (the default), non-finite training, flags out of range, where a resumed or repeated run
writes, line ends and over-long fields in CSV files, labels that are not 0 or 1, SIGTERM."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import finetune
import finetune_data
import train
from machinery import checkpoints, console
from machinery.run import Run

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--num_records", "16", "--batch_size", "4", "--epochs", "1", "--num_workers", "0", "--fusion_check", "0"]


def cli(script, *argv, cwd, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line(done, script: str, code: int = 2) -> str:
    """The error line of a finished command, checked to be its only line on stderr."""
    assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"{script}: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def films(folder: Path, n: int, bad: int | None = None) -> list[str]:
    """n small gray PNG films in `folder`; film `bad` cut short halfway (a truncated download)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        path = folder / f"film{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (160, 160), dtype=np.uint8)).save(path)
        if i == bad:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        names.append(path.name)
    return names


# ----------------------------------------------------------------------------- bad films in loader workers


def test_train_names_a_truncated_film_from_a_loader_worker_in_one_line(tmp_path):
    names = films(tmp_path / "films", 4, bad=2)
    (tmp_path / "training.csv").write_text("image_path,report_content\n" + "".join(
        f"{n},Small left pleural effusion.\n" for n in names))
    done = cli("train.py", "--data", "training.csv", "--image_root", "films", "--batch_size", "2", "--epochs", "1",
               cwd=tmp_path)  # the default --num_workers 2
    err = one_line(done, "train.py")
    assert err.startswith("train.py: error: ") and "film2.png" in err and "line 4" in err
    assert "DataLoader worker" not in err


def test_finetune_names_a_truncated_film_from_a_loader_worker_in_one_line(tmp_path):
    names = films(tmp_path / "films", 4, bad=1)
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.txt").write_text("".join(f"{n} {i % 2}\n" for i, n in enumerate(names)))
    done = cli("finetune.py", "--dataset", "custom", "--train_list", "train.txt", "--val_list", "val.txt",
               "--test_list", "test.txt", "--image_root", "films", "--init", "none", "--preset", "tiny",
               "--steps", "2", "--lr", "0.1", "--batch_size", "2", cwd=tmp_path)  # the default --num_workers 2
    err = one_line(done, "finetune.py")
    assert "film1.png" in err and "DataLoader worker" not in err


def test_the_worker_message_is_the_original_one():
    wrapped = data.BadRecord("Caught BadRecord in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                             "last):\n  File \"data.py\", line 9, in load\n    raise BadRecord(msg)\n"
                             "data.BadRecord: a.png, line 3: cannot read the image (truncated)\n")
    assert console.original_message(wrapped) == "a.png, line 3: cannot read the image (truncated)"
    assert console.original_message(data.BadRecord("plain")) == "plain"


# ----------------------------------------------------------------------------- non-finite training


def test_weights_that_turn_non_finite_in_the_last_step_are_never_saved(tmp_path, monkeypatch, capsys):
    """The loss of an epoch's last step comes before its update: a checkpoint checked only by the losses
    would hold NaN weights. The update of step 8 (the end of epoch 2) breaks one weight here."""
    real_step, calls = train.train_step, []

    def breaks_on_step_8(net, *args, **kwargs):
        out = real_step(net, *args, **kwargs)
        calls.append(1)
        if len(calls) == 8:
            with torch.no_grad():
                next(net.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(train, "train_step", breaks_on_step_8)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main([*SMALL, "--epochs", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "after step 8 (epoch 2)" in err and "not finite" in err and "Likely cause" in err
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # epoch 1's, as it was
    assert ckpt["epoch"] == 1 and all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not list(out.glob("*.tmp"))


def test_a_loss_gone_nan_names_both_losses_and_the_likely_cause(tmp_path, monkeypatch, capsys):
    nan = torch.tensor(float("nan"))
    monkeypatch.setattr(train, "train_step", lambda *a, **k: dict(loss=nan, loss_mim=torch.tensor(0.1), loss_mlm=nan,
                                                                    skipped=torch.tensor(0)))
    with pytest.raises(SystemExit):
        train.main([*SMALL, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "the loss is nan at step 1 (epoch 1): image loss 0.1" in err and "report loss nan" in err
    assert "No checkpoint was written. Likely cause: an lr too high" in err


def test_settings_that_cannot_work_are_refused_before_training(tmp_path):
    done = cli("train.py", "--mask_ratio", "0.99", "--num_records", "8", cwd=tmp_path)
    assert "--mask_ratio 0.99 leaves none of the 64 patches visible" in one_line(done, "train.py")
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- flags out of range


@pytest.mark.parametrize("script, flag, value, says", [
    ("train.py", "--batch_size", "0", "0 is outside [1, inf]"),
    ("train.py", "--accum_iter", "0", "outside [1, inf]"),
    ("train.py", "--save_every", "0", "outside [1, inf]"),
    ("train.py", "--log_every", "0", "outside [1, inf]"),
    ("train.py", "--num_workers", "-1", "outside [0, inf]"),
    ("train.py", "--num_records", "0", "outside [1, inf]"),
    ("train.py", "--epochs", "-1", "outside [1, inf]"),
    ("train.py", "--epochs", "2.5", "'2.5' is not an integer"),
    ("train.py", "--blr", "nan", "'nan' is not a finite number"),
    ("train.py", "--blr", "0", "0 is outside (0, inf]"),
    ("train.py", "--blr", "-0.001", "-0.001 is outside (0, inf]"),
    ("train.py", "--mask_ratio", "1", "outside [0, 1)"),
    ("train.py", "--warmup_epochs", "inf", "not a finite number"),
    ("finetune.py", "--batch_size", "0", "outside [1, inf]"),
    ("finetune.py", "--steps", "0", "outside [1, inf]"),
    ("finetune.py", "--lr", "nan", "not a finite number"),
    ("finetune.py", "--label_fraction", "0", "outside (0, 1]"),
    ("finetune.py", "--drop_path", "1", "outside [0, 1)"),
])
def test_a_number_out_of_range_is_one_line_naming_the_flag(script, flag, value, says, capsys):
    main = {"train.py": train.main, "finetune.py": finetune.main}[script]
    with pytest.raises(SystemExit) as e:
        main([flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{script}: error: argument {flag}: ") and says in err, err


@pytest.mark.parametrize("script", ["train.py", "finetune.py"])
def test_out_naming_a_file_is_refused(tmp_path, script):
    (tmp_path / "notes.txt").write_text("mine")
    done = cli(script, "--out", "notes.txt", "--num_records", "8", cwd=tmp_path)
    assert "--out notes.txt is a file, not a folder" in one_line(done, script)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_bad_lr_grid_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--lr_grid", "0.1,fast", "--out", str(tmp_path / "ft")])
    assert "--lr_grid 0.1,fast: 'fast' is not a positive number" in capsys.readouterr().err


# ----------------------------------------------------------------------------- where runs write


def test_resume_writes_beside_the_checkpoint_it_continues(tmp_path, capsys):
    base = tmp_path / "base"
    train.main([*SMALL, "--out", str(base)])
    shutil.copytree(base, tmp_path / "moved")
    before = {p.name: digest(p) for p in base.iterdir()}
    capsys.readouterr()
    train.main(["--resume", str(tmp_path / "moved" / "ckpt.pt"), "--epochs", "2"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"writing to {tmp_path / 'moved'}, continuing {tmp_path / 'moved' / 'ckpt.pt'}"
    assert {p.name: digest(p) for p in base.iterdir()} == before  # the original run is untouched
    assert torch.load(tmp_path / "moved" / "ckpt.pt", weights_only=True)["epoch"] == 2
    train.main(["--resume", str(tmp_path / "moved" / "ckpt.pt"), "--epochs", "3", "--out", str(tmp_path / "third")])
    assert torch.load(tmp_path / "third" / "ckpt.pt", weights_only=True)["epoch"] == 3


def test_finetune_never_empties_an_earlier_run_without_resume_or_overwrite(tmp_path):
    argv = ["--num_records", "16", "--num_val", "8", "--num_test", "8", "--steps", "2", "--eval_every", "1",
            "--batch_size", "4", "--init", "none", "--num_workers", "0", "--out", "ft"]
    assert cli("finetune.py", *argv, cwd=tmp_path).returncode == 0
    kept = {p.relative_to(tmp_path): digest(p) for p in (tmp_path / "ft").rglob("*") if p.is_file()}
    # the failing rerun of the issue (an lr that cannot work) and a plain rerun: refused, nothing touched
    for extra in (["--lr", "1e9"], []):
        done = cli("finetune.py", *argv, *extra, cwd=tmp_path)
        err = one_line(done, "finetune.py")
        assert "--out ft holds an earlier run (" in err and "--resume" in err and "--overwrite" in err
        assert {p.relative_to(tmp_path): digest(p) for p in (tmp_path / "ft").rglob("*") if p.is_file()} == kept
    assert cli("finetune.py", *argv, "--resume", cwd=tmp_path).returncode == 0  # finished: nothing to do
    assert cli("finetune.py", *argv, "--overwrite", "--steps", "3", cwd=tmp_path).returncode == 0


# ----------------------------------------------------------------------------- text files


def test_a_csv_with_old_mac_line_ends_reads_as_lines(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "training.csv"
    path.write_bytes(b"image_path,report_content\ra.png,Small effusion.\ra.png,\"Two\rlines.\"\r")
    images, reports, bad = data.read_training_csv(path, tmp_path)
    assert reports == ["Small effusion.", "Two\nlines."] and bad == 0
    assert images.where(1).endswith("training.csv, line 3")


def test_a_csv_field_over_the_limit_is_named_with_its_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "training.csv"
    path.write_text("image_path,report_content\na.png,Fine.\na.png,\"" + "x" * 200_000 + "\"\n")
    with pytest.raises(data.BadRecord, match=r"training.csv, line 3: not a readable CSV row \(field larger"):
        data.read_training_csv(path, tmp_path)


@pytest.mark.parametrize("label", ["5", "-3", "0.5"])
def test_split_list_labels_must_be_0_or_1(tmp_path, label):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "train.txt").write_text(f"a.png 0 1\na.png 1 {label}\n")
    with pytest.raises(data.BadRecord, match=rf"train.txt, line 2: labels must be 0 or 1, got \['1', '{label}'\]"):
        finetune_data.read_split_list(str(tmp_path / "train.txt"), str(tmp_path))


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_during_a_save_lets_it_finish_and_stops_at_the_epoch_s_end(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM arriving while epoch 2's checkpoint is written: inside the loop a signal waits
    for a step boundary, so the save finishes, the run stops at the end of that epoch (not after epoch 3's
    steps), leaves no temporary file, and one line says how to continue."""
    out, real_save, saves = tmp_path / "run", torch.save, []

    def signalled_midway(obj, f):
        saves.append(1)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", signalled_midway)
    with pytest.raises(SystemExit) as e:
        train.main([*SMALL, "--epochs", "3", "--log_every", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 143 and err.count("\n") == 1
    assert err == (f"train.py: stopped by SIGTERM; the last checkpoint {out / 'ckpt.pt'} is intact; continue with: "
                   f"python train.py --resume {out / 'ckpt.pt'} --epochs 3\n")
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 2 and not list(out.glob("*.tmp*"))
    assert max(json.loads(line).get("epoch", 0) for line in open(out / "log.jsonl")) == 2  # no step of epoch 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only as long as the run


def test_sigterm_to_a_running_train_py_with_loader_workers(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--num_records", "16", "--batch_size", "4",
                             "--epochs", "200", "--fusion_check", "0", "--out", "run"],  # default --num_workers 2
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "run" / "ckpt.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in 240 s"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("train.py: stopped by SIGTERM; the last checkpoint") and "--resume" in err
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert checkpoints.load_checkpoint(str(ckpt))["epoch"] >= 1


def test_the_two_finetuning_demos_write_apart():
    """`python finetune.py` then `python finetune.py --task segment`: the second does not find the
    first's run in its --out (which it would have to refuse)."""
    def default_out(**given) -> str:
        return finetune.resolve(finetune.FinetuneConfig(init="none", **given), Run("finetune.py"))[0].out

    assert default_out() == os.path.join("out", "finetune")
    assert default_out(task="segment") == os.path.join("out", "segment")
    assert default_out(task="segment", out="runs/a") == "runs/a"
