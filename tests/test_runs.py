"""A run's folder is its own (issue 35), each case run as a user runs it, from the command line: a fresh run
refuses a folder that holds another run, nothing is written before every check has passed, two runs never
write one folder at once, a full disk is one line, a stop names only checkpoints this run wrote, and the
dry runs refuse what the runs refuse."""
import hashlib
import json
import os
import resource
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
import train
from machinery import images, settings

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--num_records", "16", "--batch_size", "4", "--epochs", "1", "--fusion_check", "0"]  # default workers
FINETUNE = ["--num_records", "16", "--num_val", "8", "--num_test", "8", "--steps", "2", "--eval_every", "1",
            "--batch_size", "4", "--init", "none", "--out", "ft"]


def cli(script, *argv, cwd, timeout=300, **kw):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kw)


def one_line(done, script: str, code: int = 2) -> str:
    """The error line of a finished command, checked to be its only line on stderr."""
    assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"{script}: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def digests(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished train.py run: its folder, to copy."""
    where = tmp_path_factory.mktemp("finished")
    assert cli("train.py", *SMALL, "--out", "run", cwd=where).returncode == 0
    return where / "run"


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    for p in run.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


# ----------------------------------------------------------------------------- train.py owns its --out


def test_a_second_run_into_a_run_s_folder_is_refused_and_touches_nothing(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = digests(run)
    err = one_line(cli("train.py", *SMALL, "--out", "run", cwd=tmp_path), "train.py")
    assert "--out run holds an earlier run (ckpt.pt, curves.png, log.jsonl, ...): pass --resume run/ckpt.pt" in err
    assert "--overwrite" in err and digests(run) == before


def test_overwrite_replaces_the_whole_earlier_run(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    (run / "notes.txt").write_text("mine")  # not a run's file: stays
    done = cli("train.py", *SMALL, "--num_records", "12", "--overwrite", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert ", replacing the run there" in done.stdout.splitlines()[1]
    lines = (run / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"step": 3' in lines[0]  # 12 records of 4: this run's one line, not the old run's too
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("bad", [["--init", "missing.pth"], ["--data", "missing.csv"], ["--resume", "run/ckpt.pt"]])
def test_a_refused_run_writes_nothing_into_a_finished_run_s_folder(finished, tmp_path, bad):
    run = copy_of(finished, tmp_path)
    before = digests(run)
    flags = [*SMALL, *bad, "--out", "run"] + (["--overwrite"] if bad[0] != "--resume" else [])
    err = one_line(cli("train.py", *flags, cwd=tmp_path), "train.py")
    assert ("missing" in err) if bad[0] != "--resume" else "has done 1 epochs already" in err
    assert digests(run) == before  # tokenizer.json included


def test_two_runs_never_write_one_folder_at_once_and_a_killed_run_leaves_no_lock(tmp_path):
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SMALL, "--epochs", "200", "--out", "run"],
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = first.stdout.readline()
        while line and not line.startswith("writing to"):  # it holds the folder from this line on
            line = first.stdout.readline()
        assert line, "the first run stopped before it took its folder"
        err = one_line(cli("train.py", *SMALL, "--overwrite", "--out", "run", cwd=tmp_path), "train.py")
        assert "--out run is being written by another run" in err
    finally:
        first.kill()  # SIGKILL: no way out of it runs, a temporary file may be left
        first.wait()
    done = cli("train.py", *SMALL, "--overwrite", "--out", "run", cwd=tmp_path)  # the lock died with its run
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "run").glob("*.tmp*"))  # and the next run to hold the folder removed its files


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_stays(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = (run / "ckpt.pt").read_bytes()

    def small_files():  # a file may not grow past 2 MB: the checkpoint cannot be written, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 21, 2 ** 21))

    done = cli("train.py", "--resume", "run/ckpt.pt", "--epochs", "2", cwd=tmp_path, preexec_fn=small_files)
    err = one_line(done, "train.py")
    assert err.startswith("train.py: error: ") and err.endswith("run/ckpt.pt: cannot write: File too large\n")
    assert (run / "ckpt.pt").read_bytes() == before and not list(run.glob("*.tmp*"))
    assert cli("train.py", "--resume", "run/ckpt.pt", "--epochs", "2", cwd=tmp_path).returncode == 0


def test_an_out_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    err = one_line(cli("train.py", *SMALL, "--out", "notes.txt/run", cwd=tmp_path), "train.py")
    assert err == "train.py: error: notes.txt/run: Not a directory\n"


def test_a_replacing_run_gone_non_finite_names_no_checkpoint_of_the_old_one(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    done = cli("train.py", *SMALL, "--overwrite", "--blr", "1e30", "--log_every", "1", "--out", "run", cwd=tmp_path)
    err = one_line(done, "train.py")
    assert "No checkpoint was written. Likely cause: an lr too high" in err
    assert not (run / "ckpt.pt").exists() and '"step": 1,' in (run / "log.jsonl").read_text().splitlines()[0]


def test_the_largest_mask_ratio_the_refusal_names_is_accepted(tmp_path):
    err = one_line(cli("train.py", "--mask_ratio", "0.99", "--dry_run", cwd=tmp_path), "train.py")
    assert err.endswith("(at most 0.9843)\n")
    assert cli("train.py", "--mask_ratio", "0.9843", "--dry_run", cwd=tmp_path).returncode == 0


def test_a_run_started_with_overwrite_resumes(finished, tmp_path):
    copy_of(finished, tmp_path)
    assert cli("train.py", *SMALL, "--overwrite", "--out", "run", cwd=tmp_path).returncode == 0
    done = cli("train.py", "--resume", "run/ckpt.pt", "--epochs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    err = one_line(cli("train.py", "--resume", "run/ckpt.pt", "--epochs", "3", "--overwrite", cwd=tmp_path), "train.py")
    assert "--resume continues the run in its folder and --overwrite replaces it: give one" in err


def test_a_resume_into_another_run_s_folder_is_refused(finished, tmp_path):
    copy_of(finished, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.jsonl").write_text('{"step": 1, "epoch": 1}\n')
    err = one_line(cli("train.py", "--resume", "run/ckpt.pt", "--epochs", "2", "--out", "other", cwd=tmp_path),
                   "train.py")
    assert "--out other holds an earlier run (log.jsonl)" in err
    assert (other / "log.jsonl").read_text() == '{"step": 1, "epoch": 1}\n'


def test_a_failed_run_lets_its_folder_go(tmp_path, monkeypatch, capsys):
    nan = torch.tensor(float("nan"))
    monkeypatch.setattr(train, "train_step", lambda *a, **k: dict(loss=nan, loss_mim=torch.tensor(0.1), loss_mlm=nan,
                                                                    skipped=torch.tensor(0)))
    with pytest.raises(SystemExit):
        train.main([*SMALL, "--num_workers", "0", "--out", str(tmp_path / "run")])
    assert "the loss is nan at step 1" in capsys.readouterr().err
    done = cli("train.py", *SMALL, "--overwrite", "--out", "run", cwd=tmp_path)  # this process still runs
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- what a stop says


def test_ctrl_c_before_anything_is_written_advises_no_older_run(finished, tmp_path, monkeypatch, capsys):
    run = copy_of(finished, tmp_path)
    monkeypatch.chdir(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "train_tokenizer", interrupted)  # Ctrl-C while the vocabulary is built
    with pytest.raises(SystemExit) as e:
        train.main([*SMALL, "--num_workers", "0", "--overwrite", "--out", "run"])
    assert e.value.code == 130 and capsys.readouterr().err == "train.py: interrupted; no checkpoint was written\n"
    assert (run / "ckpt.pt").exists()  # the older run is still there: nothing was replaced


def test_sigterm_while_a_picture_is_written_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    # finetune.py stops at once (train.py's loop would let the picture finish, then stop): the half-written
    # curves.png is removed, and one line names the checkpoint the run wrote
    real_save = Image.Image.save

    def stopped_midway(self, fp, *a, **k):
        if str(fp).endswith(".tmp.png") and "curves" in str(fp):
            Path(fp).write_bytes(b"half a picture")
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", stopped_midway)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        finetune.main([*FINETUNE, "--num_workers", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 143 and err.startswith("finetune.py: stopped by SIGTERM; the last checkpoint ft/lr_")
    assert err.endswith("last.pt is intact; continue with: the same command with --resume\n")
    assert not [p.name for p in (tmp_path / "ft").rglob("*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------- records and resumes


def test_a_film_whose_pixels_are_not_finite_is_refused_naming_it(tmp_path):
    pixels = np.ones((64, 64), np.float32)
    pixels[3, 5] = np.nan
    Image.fromarray(pixels, "F").save(tmp_path / "film.tif")
    with pytest.raises(images.BadRecord, match=r"film.tif: cannot read image \(ValueError: 1 pixels are not finite"):
        images.load_image(tmp_path / "film.tif")
    (tmp_path / "training.csv").write_text("image_path,report_content\nfilm.tif,Small left effusion.\n")
    done = cli("train.py", "--data", "training.csv", "--batch_size", "1", "--epochs", "1", "--fusion_check", "0",
               cwd=tmp_path)  # the default loader workers
    assert "film.tif: cannot read image (ValueError: 1 pixels are not finite" in one_line(done, "train.py")


def test_many_missing_images_say_so_in_the_first_line(tmp_path):
    Image.new("L", (64, 64)).save(tmp_path / "a.png")
    rows = ["a.png,Small effusion."] + [f"gone{i}.png,Small effusion." for i in range(50)]
    (tmp_path / "training.csv").write_text("image_path,report_content\n" + "\n".join(rows) + "\n")
    done = cli("train.py", "--data", "training.csv", "--batch_size", "1", cwd=tmp_path)
    first = done.stderr.splitlines()[0]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert first.startswith("train.py: error: 50 bad rows (use --skip_bad to skip them), the first: ")
    assert first.endswith("training.csv, line 3: image " + os.path.join(str(tmp_path), "gone0.png") + " does not exist;"
                          " the others:")


def test_dry_runs_refuse_what_the_runs_refuse(finished, tmp_path, monkeypatch, capsys):
    copy_of(finished, tmp_path)
    monkeypatch.chdir(tmp_path)  # main() as the command line runs it, in this process

    def refused(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            train.main([*argv, "--dry_run"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        return err

    assert "--epochs 1: run/ckpt.pt has done 1 epochs already; to go on, give --epochs above 1" in refused(
        "--resume", "run/ckpt.pt", "--epochs", "1")
    assert "8 records are too few for 1 x 16 x 1" in refused("--num_records", "8", "--batch_size", "16")
    assert "holds an earlier run" in refused("--out", "run")


# ----------------------------------------------------------------------------- finetune.py


@pytest.mark.parametrize("grid, says", [("3e-2,abc", "'abc' is not a positive number"),
                                        ("3e-2,nan", "'nan' is not a positive number"),
                                        ("1e-3,0.001", "'1e-3' and '0.001' are the same lr")])
def test_a_bad_lr_grid_is_refused_by_the_dry_run_too(tmp_path, grid, says, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # main() as the command line runs it, in this process (a process costs 3 s)
    for dry in ([], ["--dry_run"]):
        with pytest.raises(SystemExit) as e:
            finetune.main([*FINETUNE, "--lr_grid", grid, *dry])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and says in err, err


def test_finetune_overwrite_with_an_unreadable_film_leaves_no_half_of_the_earlier_run(tmp_path):
    (tmp_path / "films").mkdir()
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (96, 96), dtype=np.uint8)).save(
            tmp_path / "films" / f"f{i}.png")
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.txt").write_text("".join(f"f{i}.png {i % 2}\n" for i in range(8)))
    flags = ["--dataset", "custom", "--train_list", "train.txt", "--val_list", "val.txt", "--test_list", "test.txt",
             "--image_root", "films", "--init", "none", "--preset", "tiny", "--steps", "2", "--lr", "0.1",
             "--batch_size", "2", "--out", "ft"]
    assert cli("finetune.py", *flags, cwd=tmp_path).returncode == 0
    cut = tmp_path / "films" / "f3.png"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    err = one_line(cli("finetune.py", *flags, "--overwrite", cwd=tmp_path), "finetune.py")  # default workers
    assert "f3.png" in err
    left = sorted(str(p.relative_to(tmp_path / "ft")) for p in (tmp_path / "ft").rglob("*") if p.is_file())
    assert "results.json" not in left and not any(p.endswith(("best.pt", "last.pt")) for p in left), left


def test_finetune_overwrite_checks_the_init_first_and_its_run_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # main() as the command line runs it, in this process (a process costs 3 s)
    flags = [*FINETUNE, "--num_workers", "0"]
    finetune.main(flags)
    before = digests(tmp_path / "ft")
    torch.save({"model": {"foo": torch.zeros(3)}}, tmp_path / "bad.pth")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        finetune.main([*flags[:-6], "--init", "bad.pth", "--out", "ft", "--num_workers", "0", "--overwrite"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "bad.pth: none of its 1 tensors matches a parameter of ViT" in err, err
    assert digests(tmp_path / "ft") == before
    finetune.main([*flags, "--overwrite", "--steps", "3"])
    finetune.main([*flags, "--steps", "3", "--resume"])  # a run started with --overwrite resumes (finished: done)


def test_finetune_overwrite_leaves_no_half_of_the_earlier_run(tmp_path):
    assert cli("finetune.py", *FINETUNE, cwd=tmp_path).returncode == 0
    assert "holds an earlier run" in one_line(cli("finetune.py", *FINETUNE, "--dry_run", cwd=tmp_path), "finetune.py")
    # replaced by a run that stops on a NaN loss at its first step: nothing of the earlier run is left
    done = cli("finetune.py", *FINETUNE, "--overwrite", "--lr", "1e30", "--optimizer", "sgd", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr  # (8 validation films: a warning)
    assert done.stderr.splitlines()[-1].startswith("finetune.py: error: the loss is nan")
    left = sorted(str(p.relative_to(tmp_path / "ft")) for p in (tmp_path / "ft").rglob("*") if p.is_file())
    assert "results.json" not in left and not any("lr_0.0001" in p for p in left), left


# ----------------------------------------------------------------------------- loader workers


def test_loader_workers_keep_a_gpu_fed_and_a_laptop_as_it_was(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert settings.loader_workers(None, cpu) == 2 and settings.loader_workers(5, gpu) == 5
    assert settings.loader_workers(0, gpu) == 0
    for cpus, processes, workers in [(16, 1, 8), (16, 4, 3), (32, 4, 7), (2, 1, 2), (64, 1, 8)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        assert settings.loader_workers(None, gpu) == workers, (cpus, processes)


def test_the_dry_run_says_how_many_loader_workers(tmp_path):
    done = cli("train.py", "--dry_run", cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["loader_workers"] == 2  # this CPU: as before
    done = cli("train.py", "--dry_run", "--num_workers", "5", cwd=tmp_path)
    assert json.loads(done.stdout)["loader_workers"] == 5


# ----------------------------------------------------------------------------- under torchrun (2 gloo processes)


def torchrun(*argv, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *map(str, argv)], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def ours(stderr: str) -> list[str]:
    """Our lines of a torchrun's stderr (torchrun adds its own: docs/errors.md)."""
    return [line for line in stderr.splitlines() if line.startswith("train.py")]


def test_under_torchrun_a_setting_error_is_one_line_and_every_process_exits_2(tmp_path):
    err = torchrun(*SMALL, "--mask_ratio", "0.999", cwd=tmp_path).communicate(timeout=120)[1]
    assert ours(err) == ["train.py: error: --mask_ratio 0.999 leaves none of the 64 patches visible: the encoder "
                         "would see nothing (at most 0.9843)"], err
    assert err.count("exitcode  : 2 ") == 2 and "[rank" not in err, err


def test_under_torchrun_a_bad_film_is_one_line_naming_its_rank(tmp_path):
    (tmp_path / "films").mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (160, 160), dtype=np.uint8)).save(
            tmp_path / "films" / f"f{i}.png")
    cut = tmp_path / "films" / "f2.png"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (tmp_path / "training.csv").write_text("image_path,report_content\n" + "".join(
        f"f{i}.png,Small left effusion.\n" for i in range(4)))
    err = torchrun("--data", "training.csv", "--image_root", "films", "--batch_size", "1", "--epochs", "1",
                   "--fusion_check", "0", cwd=tmp_path).communicate(timeout=180)[1]
    lines = ours(err)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: rank ") and "f2.png" in lines[0], err
    assert err.count("exitcode  : 2 ") == 2 and "[rank" not in err, err


def test_sigterm_to_torchrun_stops_every_process_and_says_how_to_continue_there(tmp_path):
    run = torchrun(*SMALL, "--epochs", "200", "--out", "run", cwd=tmp_path)
    ckpt = tmp_path / "run" / "ckpt.pt"
    for _ in range(600):
        if ckpt.exists() or run.poll() is not None:
            break
        time.sleep(0.2)
    assert ckpt.exists(), run.communicate()[1]
    run.send_signal(signal.SIGTERM)
    err = run.communicate(timeout=120)[1]
    assert ours(err) == ["train.py: stopped by SIGTERM; the last checkpoint run/ckpt.pt is intact; continue with: "
                         "torchrun --nproc_per_node 2 train.py --resume run/ckpt.pt --epochs 200"], err
    assert "[rank" not in err and not list((tmp_path / "run").glob("*.tmp*"))
    # continued in one process instead: the line says what that changes
    done = cli("train.py", "--resume", "run/ckpt.pt", "--epochs", str(torch.load(ckpt)["epoch"] + 1), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "processes 2 -> 1, effective batch 8 -> 4, lr 0.000469 -> 0.000234" in done.stdout.splitlines()[1]
