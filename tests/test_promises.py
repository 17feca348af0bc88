"""What a run promises, each case of issue 39's list run as a user runs it: nothing of a user's is removed,
--overwrite replaces a run of its own script only, log.jsonl never makes a run impossible to resume, every
stop ends in one line whose advice works, a resumed fine-tuning finds its folder however it is spelled, and
the dry runs refuse what the runs refuse. In this process (train.main, finetune.main: what the command line
runs) where the process boundary is not what a case tests."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checks
import finetune
import train
from machinery.files import append_line, read_log
from test_finetune import run_stopped_at_second_validation, small_config, stop_at_second_validation

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--num_records", "16", "--batch_size", "4", "--epochs", "1", "--fusion_check", "0", "--num_workers", "0"]
FINETUNE = ["--num_records", "16", "--num_val", "8", "--num_test", "8", "--steps", "2", "--eval_every", "1",
            "--batch_size", "4", "--init", "none", "--num_workers", "0"]


def stopped(main, argv, capsys, code=2) -> str:
    """A script's main run to a stop: its exit status checked, its one line on stderr returned."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A finished train.py run (its folder): one epoch of 16 records."""
    where = tmp_path_factory.mktemp("pretrained") / "run"
    train.main([*SMALL, "--out", str(where)])
    return where


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A finished finetune.py run (its folder)."""
    where = tmp_path_factory.mktemp("finetuned") / "ft"
    finetune.main([*FINETUNE, "--out", str(where)])
    return where


def copy(run: Path, to: Path) -> Path:
    for rel, data in files(run).items():
        (to / rel).parent.mkdir(parents=True, exist_ok=True)
        (to / rel).write_bytes(data)
    return to


# ----------------------------------------------------------------------------- nothing of a user's is removed


def test_a_run_removes_no_file_of_a_user_s_nor_another_run_s_temporary_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.5.tmp").write_text("precious")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "img.0001.tmp.jpg").write_text("a photo")
    (tmp_path / "finetune").mkdir()  # a fine-tuning run writing below: its picture under way
    (tmp_path / "finetune" / "curves.png.4242.tmp.png").write_text("half a picture")
    (tmp_path / "ckpt.pt.4242.tmp").write_text("what a killed train.py run left")
    train.main([*SMALL, "--out", "."])
    assert (tmp_path / "notes.5.tmp").read_text() == "precious"
    assert (tmp_path / "photos" / "img.0001.tmp.jpg").read_text() == "a photo"
    assert (tmp_path / "finetune" / "curves.png.4242.tmp.png").exists()
    assert not (tmp_path / "ckpt.pt.4242.tmp").exists()  # its own kind, in its own folder: a killed run's


# ----------------------------------------------------------------------------- a folder holds one script's run


def test_overwrite_replaces_a_run_of_its_own_script_only(pretrained, finetuned, tmp_path, capsys):
    pre, fine = copy(pretrained, tmp_path / "pre"), copy(finetuned, tmp_path / "fine")
    before = files(pre), files(fine)
    err = stopped(finetune.main, [*FINETUNE, "--out", str(pre), "--overwrite"], capsys)
    assert f"--out {pre} holds a train.py run (ckpt.pt, curves.png, log.jsonl, ...): --overwrite replaces " \
           "only a finetune.py run; pick another --out" in err
    err = stopped(train.main, [*SMALL, "--out", str(fine), "--overwrite"], capsys)
    assert f"--out {fine} holds a finetune.py run (" in err and "replaces only a train.py run" in err
    assert (files(pre), files(fine)) == before
    assert (pre / ".lock").read_text() == "train.py\n" and (fine / ".lock").read_text() == "finetune.py\n"


# ----------------------------------------------------------------------------- log.jsonl


@pytest.mark.parametrize("damage", ["\n", "\r\n", '{"step": 9, "epo'])  # a blank line, a CRLF, a line cut short
def test_a_damaged_log_end_still_resumes(pretrained, tmp_path, capsys, damage):
    run = copy(pretrained, tmp_path / "run")
    log = run / "log.jsonl"
    log.write_bytes(log.read_bytes().replace(b"\n", b"\r\n") if damage == "\r\n" else log.read_bytes() + damage.encode())
    train.main(["--resume", str(run / "ckpt.pt"), "--epochs", "2"])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in lines if "step" in r] == [1, 2] and torch.load(run / "ckpt.pt")["epoch"] == 2


def test_a_broken_log_line_is_one_line_naming_it(pretrained, tmp_path, capsys):
    run = copy(pretrained, tmp_path / "run")
    (run / "log.jsonl").write_text('{"step": 4, "epoch": 1}\nnot json\n{"step": 8, "epoch": 2}\n')
    err = stopped(train.main, ["--resume", str(run / "ckpt.pt"), "--epochs", "2"], capsys)
    assert err.endswith(f"{run / 'log.jsonl'}, line 2: not a JSON object; remove the line (or the file) to go on\n")


def test_a_log_line_is_appended_whole_or_not_at_all(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n')
    code = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40)); from machinery.files import append_line; "
            f"append_line({str(log)!r}, {{'step': 2, 'loss': 0.123456789012345678}})")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert f"OSError: [Errno 27] cannot write: File too large: '{log}'" in done.stderr  # the file, named
    assert log.read_text() == '{"step": 1}\n'
    append_line(str(log), {"step": 2, "loss": float("nan")})  # JSON has no NaN: null
    assert read_log(str(log)) == [{"step": 1}, {"step": 2, "loss": None}]


# ----------------------------------------------------------------------------- each stop's advice works


def test_a_stop_after_the_last_save_says_the_run_had_finished_and_keeps_the_check(tmp_path, monkeypatch, capsys):
    real = checks.held_out_check

    def signalled(*args, **kwargs):  # SIGTERM while the end's fusion check runs
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(checks, "held_out_check", signalled)
    out = tmp_path / "run"
    err = stopped(train.main, [*SMALL, "--fusion_check", "8", "--out", str(out)], capsys, code=143)
    assert err == f"train.py: stopped by SIGTERM; the run had finished: {out / 'ckpt.pt'} holds its 1 epochs\n"
    assert "fusion_check" in read_log(str(out / "log.jsonl"))[-1]  # the check finished and was logged


def test_a_stop_before_the_first_checkpoint_advises_overwrite_and_that_works(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real = train.train_step
    monkeypatch.setattr(train, "train_step", interrupted)
    err = stopped(train.main, [*SMALL, "--out", "run"], capsys, code=130)
    assert err == "train.py: interrupted; no checkpoint was written; the same command with --overwrite starts it again\n"
    monkeypatch.setattr(train, "train_step", real)
    err = stopped(train.main, [*SMALL, "--out", "run"], capsys)
    assert "--out run holds an earlier run (tokenizer.json), which wrote no checkpoint: pass --overwrite" in err
    train.main([*SMALL, "--out", "run", "--overwrite"])
    assert torch.load(tmp_path / "run" / "ckpt.pt")["epoch"] == 1


def test_the_advice_quotes_a_path_with_a_space_and_its_command_works(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real, calls = train.train_step, []

    def interrupted_in_epoch_2(*args, **kwargs):  # 4 steps an epoch: after epoch 1's checkpoint
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", interrupted_in_epoch_2)
    err = stopped(train.main, [*SMALL, "--epochs", "3", "--out", "my run"], capsys, code=130)
    command = "python train.py --resume 'my run/ckpt.pt' --epochs 3"
    assert err == f"train.py: interrupted; the last checkpoint my run/ckpt.pt is intact; continue with: {command}\n"
    monkeypatch.setattr(train, "train_step", real)
    train.main(shlex.split(command)[2:])
    assert torch.load(tmp_path / "my run" / "ckpt.pt")["epoch"] == 3


def test_a_resume_into_another_folder_stopped_before_its_first_save_advises_what_works(pretrained, tmp_path,
                                                                                      monkeypatch, capsys):
    old = copy(pretrained, tmp_path / "old")
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real = train.train_step
    monkeypatch.setattr(train, "train_step", interrupted)
    err = stopped(train.main, ["--resume", str(old / "ckpt.pt"), "--epochs", "2", "--out", "new"], capsys, code=130)
    command = f"python train.py --resume {old / 'ckpt.pt'} --epochs 2 --out new --overwrite"
    assert err == f"train.py: interrupted; the last checkpoint {old / 'ckpt.pt'} is intact; continue with: {command}\n"
    monkeypatch.setattr(train, "train_step", real)
    train.main(shlex.split(command)[2:])
    assert torch.load(tmp_path / "new" / "ckpt.pt")["epoch"] == 2 and torch.load(old / "ckpt.pt")["epoch"] == 1


def test_a_lock_file_alone_claims_no_folder(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".lock").write_text("train.py\n")  # what `rm a/*` leaves of a run
    finetune.main([*FINETUNE, "--out", str(tmp_path / "a")])
    assert (tmp_path / "a" / "results.json").exists() and (tmp_path / "a" / ".lock").read_text() == "finetune.py\n"


def test_a_finetuning_run_stopped_after_overwrite_advises_resume_in_its_place(finetuned, tmp_path, monkeypatch,
                                                                               capsys):
    copy(finetuned, tmp_path / "ft")
    monkeypatch.chdir(tmp_path)
    evaluate = stop_at_second_validation(monkeypatch)
    argv = [*FINETUNE, "--steps", "3", "--out", "ft"]
    err = stopped(finetune.main, [*argv, "--overwrite"], capsys, code=130)
    assert err.endswith("is intact; continue with: the same command with --resume in place of --overwrite\n"), err
    monkeypatch.setattr(finetune, "evaluate", evaluate)
    finetune.main([*argv, "--resume"])
    assert (tmp_path / "ft" / "results.json").exists()


# ----------------------------------------------------------------------------- finetune.py --resume


@pytest.mark.parametrize("spelled", ["ft/", "./ft", "absolute"])
def test_a_finetuning_run_resumes_in_its_folder_however_it_is_spelled(tmp_path, monkeypatch, spelled):
    monkeypatch.chdir(tmp_path)
    run_stopped_at_second_validation(small_config(tmp_path, out="ft", steps=3, eval_every=1), monkeypatch)
    finetune.main([*FINETUNE, "--steps", "3", "--lr", "0.1", "--optimizer", "sgd", "--head_init", "zero",
                   "--num_records", "32", "--num_val", "16", "--num_test", "24", "--batch_size", "8", "--resume",
                   "--out", str(tmp_path / "ft") if spelled == "absolute" else spelled])
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["best_step"] in range(4)


def test_a_finished_lr_without_its_last_pt_is_not_retrained(finetuned, tmp_path, capsys):
    ft = copy(finetuned, tmp_path / "ft")
    (ft / "lr_0.0001" / "last.pt").unlink()
    before = files(ft)
    err = stopped(finetune.main, [*FINETUNE, "--out", str(ft), "--resume"], capsys)
    assert f"{ft / 'lr_0.0001' / 'best.pt'} is there but not last.pt, so this lr's run cannot be continued: pass " \
           "--overwrite instead of --resume" in err
    assert files(ft) == before


# ----------------------------------------------------------------------------- the dry runs refuse what the runs do


def test_the_dry_runs_refuse_what_their_runs_refuse(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for dry in (["--dry_run"], []):
        err = stopped(train.main, [*SMALL, "--init", "missing.pth", *dry], capsys)
        assert err == "train.py: error: missing.pth: no such checkpoint file\n"
    (tmp_path / "splits").mkdir()
    for name in ("train_10.txt", "val_list.txt", "test_list.txt"):
        (tmp_path / "splits" / name).write_text("1.2.3\n")
    for dry in (["--dry_run"], []):
        err = stopped(finetune.main, ["--task", "segment", "--dataset", "siim", "--ratio", "10", "--splits", "splits",
                                      "--init", "none", *dry], capsys)
        assert "segmentation from split lists needs --mask_root (python prepare.py siim-masks)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["splits"]  # nothing written
    err = stopped(train.main, ["--fusion_check", "1", "--dry_run"], capsys)  # its other film would be its own
    assert "--fusion_check 1: its other-film control needs another record; give 0 or at least 2" in err


# ----------------------------------------------------------------------------- a busy folder, under torchrun


def test_a_second_run_into_a_folder_being_written_is_told_so(tmp_path):
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SMALL[:-2], "--epochs", "200", "--out", "run"],
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = first.stdout.readline()
        while line and not line.startswith("writing to"):
            line = first.stdout.readline()
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, "--out", "run"], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr == ("train.py: error: --out run is being written by another run; "
                                                        "wait for it, or pick another --out\n"), done.stderr
    finally:
        first.kill()
        first.wait()


def rank_1(out: str) -> int:
    """The process id of rank 1 of the torchrun run writing `out` (Linux's /proc)."""
    for p in Path("/proc").iterdir():
        try:
            argv, env = (p / "cmdline").read_bytes().split(b"\0"), (p / "environ").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if str(ROOT / "train.py").encode() in argv and out.encode() in argv and b"RANK=1" in env:
            return int(p.name)
    raise AssertionError("no rank 1")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the process in Linux's /proc")
def test_under_torchrun_a_killed_process_leaves_one_line_that_says_how_to_continue(tmp_path):
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(ROOT / "train.py"), *SMALL, "--epochs", "200", "--out", "run"], cwd=tmp_path,
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ckpt = tmp_path / "run" / "ckpt.pt"
        for _ in range(600):
            if ckpt.exists() or run.poll() is not None:
                break
            time.sleep(0.2)
        assert ckpt.exists()
        os.kill(rank_1("run"), signal.SIGKILL)  # one process of the run, killed outright
        err = run.communicate(timeout=120)[1]
    finally:
        if run.poll() is None:  # a failure above: no process of the run is left behind
            os.killpg(run.pid, signal.SIGKILL)
    ours = [line for line in err.splitlines() if line.startswith("train.py")]
    assert len(ours) == 1 and "Traceback" not in err.split("train.py", 1)[0], err
    assert "the last checkpoint run/ckpt.pt is intact; continue with: torchrun --nproc_per_node 2 train.py " \
           "--resume run/ckpt.pt --epochs 200" in ours[0], err
