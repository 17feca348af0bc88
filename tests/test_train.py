"""train.py: the schedule, checkpoints, resume exactness, DDP equivalence, a NaN stop, and end-to-end runs."""
import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import checks
import data
import prepare
import recipes
import train
from machinery import checkpoints, settings, synthetic, tokenizer
from machinery.checkpoints import load_pretrained
from machinery.run import Run
from mrm import MRM, MRMConfig, ViT

ROOT = Path(__file__).resolve().parent.parent
# a few seconds a run on a 2-core CPU: 16 synthetic records, batches of 4, the tiny model
SMALL = ["--num_records", "16", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "0.5",
         "--num_workers", "0", "--log_every", "1", "--fusion_check", "0"]


def run(out, *flags):
    """train.py's main without its one-line error framing (test_errors.py checks that): errors raise."""
    unframed = Run("train.py")
    train.train(*train.resolve([*SMALL, "--out", str(out), *flags], unframed), unframed)
    return torch.load(Path(out) / "ckpt.pt", weights_only=True)


def log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def test_lr_schedule_key_points():
    lr, lo = 1e-3, 1e-5
    assert recipes.lr_at(0, 100, 20, lr, lo) == 0
    assert recipes.lr_at(10, 100, 20, lr, lo) == pytest.approx(lr / 2)
    assert recipes.lr_at(20, 100, 20, lr, lo) == pytest.approx(lr)
    assert recipes.lr_at(60, 100, 20, lr, lo) == pytest.approx((lr + lo) / 2)
    assert recipes.lr_at(40, 100, 20, lr, lo) == pytest.approx(lo + (lr - lo) * (1 + math.cos(math.pi / 4)) / 2)
    assert recipes.lr_at(100, 100, 20, lr, lo) == pytest.approx(lo)
    assert recipes.lr_at(0, 10, 0, lr) == lr  # no warm-up
    assert recipes.lr_at(150, 100, 20, lr, lo) == pytest.approx(lo)  # past the end (a resumed, larger batch)


def test_weight_decay_spares_biases_norms_and_1d_parameters():
    model = MRM(train.model_config(recipes.fill_pretraining(train.TrainConfig()), tokenizer.train_tokenizer(["a b c"], 100)))
    decay, no_decay = recipes.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim >= 2 for p in decay["params"])
    assert any(names[id(p)].endswith("norm1.bias") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "pos_embed" in n and "report" not in n)


def test_help_lists_every_flag_with_its_default():
    text = " ".join(train.build_parser().format_help().split())
    for f in train.fields(train.TrainConfig):
        assert f"--{f.name}" in text
    assert "--epochs EPOCHS passes over the records (default: from --preset: base 200, tiny 10)" in text
    assert "--no-hflip" in text
    assert "--mask_ratio MASK_RATIO of the image patches removed (Table 5b) (default: 0.75)" in text


def test_end_to_end_on_csv_records_with_outputs(tmp_path):
    prepare.main(["synth", "--out", str(tmp_path / "records"), "--n", "20", "--size", "128"])
    ckpt = run(tmp_path / "out", "--data", str(tmp_path / "records" / "training.csv"))
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8 and ckpt["config"]["data"].endswith("training.csv")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    lines = log(tmp_path / "out")
    assert [l["step"] for l in lines] == list(range(1, 9))
    assert set(lines[0]) >= {"step", "lr", "loss", "loss_mim", "loss_mlm", "images_per_s"}
    assert all(math.isfinite(l["loss"]) for l in lines)
    assert (tmp_path / "out" / "recon.png").stat().st_size > 10_000
    assert Image.open(tmp_path / "out" / "curves.png").size == (3 * 380, 286)  # L, L_I and L_R, lr
    assert (tmp_path / "out" / "tokenizer.json").exists()
    # the encoder loads from it for fine-tuning, every tensor of a matching tiny ViT
    vit = ViT(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)
    assert load_pretrained(vit, tmp_path / "out" / "ckpt.pt", verbose=False)["missing"] == []


def test_the_default_tiny_run_learns(tmp_path):
    """A shortened default run (its data, model and learning rate): the loss falls clearly."""
    train.main(["--out", str(tmp_path), "--num_records", "256", "--epochs", "3", "--num_workers", "0", "--fusion_check", "0",
                "--log_every", "1", "--save_every", "3"])
    losses = [l["loss"] for l in log(tmp_path)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_each_epoch_reshuffles_and_redraws(tmp_path, monkeypatch):
    seen, real = {}, data.PretrainDataset.__getitem__

    def spy(self, i):
        seen.setdefault(self.epoch, []).append(i)
        return real(self, i)

    monkeypatch.setattr(data.PretrainDataset, "__getitem__", spy)
    run(tmp_path, "--save_every", "9")
    assert sorted(seen) == [0, 1] and sorted(seen[0]) == sorted(seen[1]) == list(range(16)) and seen[0] != seen[1]


def test_persistent_loader_workers_draw_each_new_epoch(tmp_path):
    """train.py's loader keeps its worker processes across epochs; they still draw every sample with the
    current epoch's seed (the dataset's epoch lives in shared memory), as the main process would."""
    cfg = recipes.fill_pretraining(train.TrainConfig(num_records=8, batch_size=4, num_workers=1, out=str(tmp_path)))
    dataset, _, _ = train.build_data(cfg, None, rank=0)
    sampler, loader = train.build_loader(dataset, cfg, 1, 0, torch.device("cpu"))
    assert loader.persistent_workers
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches = list(loader)
        want = [dataset[i] for i in sampler]  # drawn here, in the main process
        for key in ("image", "labels", "noise"):
            assert torch.equal(torch.cat([b[key] for b in batches]), torch.stack([w[key] for w in want])), key
        seen.append(torch.cat([b["noise"] for b in batches]))
    assert not torch.equal(seen[0], seen[1])


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    full = run(tmp_path / "full", "--epochs", "3")
    # the same run, killed in the middle of its third epoch (after the epoch-2 checkpoint)
    real_lr_at = recipes.lr_at

    def crash_at_step_9(step, *args):
        if step == 9:
            raise KeyboardInterrupt
        return real_lr_at(step, *args)

    monkeypatch.setattr(recipes, "lr_at", crash_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", "--epochs", "3")
    monkeypatch.setattr(recipes, "lr_at", real_lr_at)
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["epoch"] == 2
    train.main(["--resume", str(tmp_path / "cut" / "ckpt.pt")])  # nothing else: the run's settings are saved
    resumed = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert resumed["epoch"] == 3 and resumed["step"] == full["step"] == 12
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert full["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    assert [l["loss"] for l in log(tmp_path / "full")] == [l["loss"] for l in log(tmp_path / "cut")]


def test_resume_keeps_the_model_and_data_and_reports_allowed_changes(tmp_path, capsys):
    run(tmp_path, "--epochs", "1", "--mask_ratio", "0.5")
    unframed = Run("train.py")
    cfg, ckpt, init = train.resolve(["--resume", str(tmp_path / "ckpt.pt"), "--epochs", "2"], unframed)
    assert cfg.mask_ratio == 0.5 and cfg.epochs == 2 and cfg.batch_size == 4 and ckpt["epoch"] == 1
    capsys.readouterr()
    train.train(cfg, ckpt, init, unframed)  # its first line says where it writes, the next what changed
    assert capsys.readouterr().out.splitlines()[1] == "resuming with changed settings: epochs 1 -> 2"
    train.main(["--resume", str(tmp_path / "ckpt.pt"), "--epochs", "3", "--dry_run"])  # stdout: the JSON alone
    assert json.loads(capsys.readouterr().out)["epochs"] == 3
    for flag, value in [("--mask_ratio", "0.75"), ("--preset", "base"), ("--seed", "1"), ("--data", "x.csv")]:
        refusal = rf"a resumed run keeps its model and data; cannot change \['{flag[2:]}'\]"
        with pytest.raises(ValueError, match=refusal):
            train.resolve(["--resume", str(tmp_path / "ckpt.pt"), flag, value], Run("train.py"))


def test_resume_on_other_hardware_continues_the_schedule(tmp_path):
    """Half the batch (as on half the GPUs) and fp16 after fp32: the schedule picks up at epoch 2 of 3
    with the new steps per epoch, so its last step has the lr of step 23 of 24 (warm-up 4, peak blr * 2 / 256)."""
    run(tmp_path, "--epochs", "2")
    train.main(["--resume", str(tmp_path / "ckpt.pt"), "--epochs", "3", "--batch_size", "2", "--amp", "fp16"])
    lines = log(tmp_path)
    assert [l["step"] for l in lines] == list(range(1, 9)) + list(range(17, 25))  # epoch 3 at 8 steps an epoch
    assert lines[-1]["lr"] == pytest.approx(recipes.lr_at(23, 24, 4, 1.5e-2 * 2 / 256)) and lines[-1]["epoch"] == 3


def test_truncated_or_foreign_checkpoints_are_refused(tmp_path):
    run(tmp_path, "--epochs", "1")
    whole = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut.pt: not a readable PyTorch checkpoint"):
        train.resolve(["--resume", str(tmp_path / "cut.pt")], Run("train.py"))
    torch.save({"model": ViT(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2).state_dict()},
               tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"weights.pt: not a train.py checkpoint .* use --init"):
        train.resolve(["--resume", str(tmp_path / "weights.pt")], Run("train.py"))


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_non_finite_loss_stops_cleanly_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, poison):
    real_forward, calls = MRM.forward, []

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) > 4 and self.training:  # epoch 2 of 4 steps an epoch
            out["loss"] = out["loss"] * float(poison)
        return out

    monkeypatch.setattr(MRM, "forward", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main([*SMALL, "--out", str(tmp_path), "--epochs", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and "Traceback" not in err
    assert f"the loss is {poison} at step 5 (epoch 2)" in err and "left as it was" in err
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not list(tmp_path.glob("*.tmp*"))


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(str(path), {"a": torch.ones(3)})
    before = hashlib.sha256(path.read_bytes()).hexdigest()

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(str(path), {"a": torch.zeros(3)})
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the old checkpoint is intact


def test_bad_rows_stop_before_training_or_are_skipped(tmp_path):
    prepare.main(["synth", "--out", str(tmp_path / "r"), "--n", "20", "--size", "128"])
    csv_path = tmp_path / "r" / "training.csv"
    rows = list(csv.reader(open(csv_path)))
    rows.append(["images/missing.png", "FINDINGS: x."])
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    (tmp_path / "r" / "images" / "00002.png").write_bytes(b"corrupt")  # found only when read
    with pytest.raises(data.BadRecord, match=r"training.csv, line 18: image .*missing.png does not exist"):
        run(tmp_path / "o1", "--data", str(csv_path))
    assert not (tmp_path / "o1" / "ckpt.pt").exists()
    run(tmp_path / "o2", "--data", str(csv_path), "--skip_bad")
    assert sum(l.get("skipped_images", 0) for l in log(tmp_path / "o2")) >= 1


def test_a_report_with_no_token_is_named_before_training(tmp_path):
    Image.new("L", (64, 64)).save(tmp_path / "a.png")
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_path", "report_content"), ("a.png", "\x07\x08")])  # control characters
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[MASK]", "a"]) + "\n")
    with pytest.raises(data.BadRecord, match=r"1 reports have no token: .*t.csv, line 2"):
        run(tmp_path / "o", "--data", str(tmp_path / "t.csv"), "--tokenizer", str(tmp_path / "vocab.txt"))


def test_accumulation_and_two_process_ddp_equal_one_big_batch(tmp_path):
    """Batch 4 in one step == 2 micro-batches of 2 == 2 gloo processes x 2 micro-batches of 1 (with
    no_sync and a loader worker) (Eq. 1 normalised over the whole step), over two steps.

    Gradients are compared through AdamW's moments (exp_avg = 0.09 g1 + 0.1 g2). Parameters are compared
    to 1e-6 at a small learning rate: AdamW divides by sqrt(v) + eps, so where a gradient is float noise
    (the key bias: softmax ignores a constant added to every key, its true gradient is 0) the update is
    about lr * noise / eps, different in every run. So the parameter check leaves the key bias out (its
    moments are still compared): that noise is AdamW's, not DDP's."""
    flags = ["--num_records", "8", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--blr", "3e-4"]
    one = run(tmp_path / "one", *flags, "--batch_size", "4")
    accum = run(tmp_path / "accum", *flags, "--batch_size", "2", "--accum_iter", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "train.py"), *SMALL, *flags, "--batch_size", "1", "--accum_iter", "2",
                    "--num_workers", "1", "--out", str(tmp_path / "ddp")],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)  # train.py's seed, before it builds the model
    tok = tokenizer.load_tokenizer(tmp_path / "one" / "tokenizer.json")
    init = MRM(train.model_config(recipes.fill_pretraining(train.TrainConfig()), tok)).state_dict()
    assert one["step"] == accum["step"] == ddp["step"] == 2
    moved = max((one["model"][k] - v).abs().max().item() for k, v in init.items())
    assert moved > 5e-6  # the runs really trained: 5 x the tolerance below (each step moves about lr = 4.7e-6)
    for other in (accum, ddp):
        for k, v in one["model"].items():
            w = other["model"][k]
            if k.endswith("attn.qkv.bias"):  # leave out the key bias: its update is lr * noise / eps
                d = len(v) // 3
                v, w = torch.cat([v[:d], v[2 * d:]]), torch.cat([w[:d], w[2 * d:]])
            torch.testing.assert_close(w, v, rtol=0, atol=1e-6, msg=k)
        for i, s in one["optimizer"]["state"].items():
            for moment in ("exp_avg", "exp_avg_sq"):  # equal to 1e-5 of each tensor's largest entry
                torch.testing.assert_close(other["optimizer"]["state"][i][moment], s[moment], rtol=1e-4,
                                           atol=1e-5 * s[moment].abs().max().item())
    for other in ("accum", "ddp"):  # the logged losses are the step's means too
        assert [l["loss"] for l in log(tmp_path / other)] == pytest.approx([l["loss"] for l in log(tmp_path / "one")])


def test_init_loads_encoder_weights(tmp_path):
    vit = ViT(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)
    torch.save({"model": vit.state_dict()}, tmp_path / "mae.pth")
    # an lr so small that the steps move no weight by more than rounding (an lr of 0 is refused)
    ckpt = run(tmp_path / "o", "--epochs", "1", "--init", str(tmp_path / "mae.pth"), "--blr", "1e-30")
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(ckpt["model"]["encoder." + k], v, rtol=1e-6, atol=1e-12, msg=k)


def test_amp_choice(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert settings.amp_dtype("auto", cuda) is torch.bfloat16  # Ampere and later: native bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert settings.amp_dtype("auto", cuda) is torch.float16  # emulated bf16 only (V100, T4): fp16 + grad scaler
    assert settings.amp_dtype("auto", torch.device("cpu")) is None
    assert settings.amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert settings.amp_dtype("off", cuda) is None


def test_torchrun_on_gpus_binds_each_process_to_its_gpu(monkeypatch):
    """Under torchrun with CUDA, rank LOCAL_RANK uses GPU LOCAL_RANK, and NCCL is told so (device_id):
    without it, torch 2.11 on an H200 warned that NCCL guessed the GPU from the rank and could hang."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(train.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 4)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.setup_distributed() == (3, 4, torch.device("cuda", 1))
    assert calls == {"set_device": 1, "backend": "nccl", "device_id": torch.device("cuda", 1)}


def test_reconstruction_shows_predictions_where_the_loss_looks(tmp_path):
    tok = tokenizer.train_tokenizer([synthetic.synth_report(i) for i in range(4)])
    for ratio in (0.75, 0.0):
        cfg = recipes.fill_pretraining(train.TrainConfig(num_records=4, mask_ratio=ratio))
        model = MRM(train.model_config(cfg, tok))
        dataset, _, _ = train.build_data(cfg, {"tokenizer": tok.to_str(), "model_config": model.cfg.to_dict()}, rank=1)
        r = checks.reconstruct(model, dataset)
        same = (r["restored"] == r["original"]).float().mean().item()
        assert same == pytest.approx(0.25 if ratio else 0.0, abs=0.02)  # visible patches are pasted back
        scored = r["labels"] != -100
        assert torch.equal(r["restored_ids"][~scored], r["tokens"][~scored])
        assert not (r["restored_ids"][scored] == 3).all()  # [MASK] replaced by guesses
        assert torch.equal(r["right"][scored], r["restored_ids"][scored] == r["labels"][scored])


def test_csv_in_the_working_folder_needs_no_image_root(tmp_path, monkeypatch):
    prepare.main(["synth", "--out", str(tmp_path), "--n", "20", "--size", "128"])
    monkeypatch.chdir(tmp_path)
    train.main([*SMALL, "--epochs", "1", "--data", "training.csv", "--out", "o"])
    assert (tmp_path / "o" / "ckpt.pt").exists()


def test_fp16_grad_scaler_path_runs_on_cpu(tmp_path):
    ckpt = run(tmp_path, "--epochs", "1", "--amp", "fp16")
    assert ckpt["scaler"]["scale"] > 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_compiled_steps_equal_eager_ones_and_compile_once():
    """torch.compile changes no result: three training steps through the compiled model (dynamo's graph
    and AOT autograd's backward, run by eager kernels: inductor's kernels are bench.py's to check on a
    GPU) give the eager losses and weights. The three batches mask different counts of words, and
    still share one graph: train_step marks mlm_index's length dynamic."""
    from torch._dynamo.testing import CompileCounterWithBackend
    import bench
    import numpy as np
    cpu = torch.device("cpu")
    cfg = MRMConfig.from_preset("tiny", vocab_size=150)
    rng = np.random.default_rng(0)
    batches = [bench.synthetic_batch(cfg, 4, rng) for _ in range(3)]
    assert len({int((b["labels"] != -100).sum()) for b in batches}) == 3
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MRM(cfg)
        optimizer = recipes.pretraining_optimizer(model, 0.05, cpu)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        counter = CompileCounterWithBackend("aot_eager")
        net = torch.compile(model, backend=counter) if compiled else model
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        steps = [train.train_step(net, None, [b], optimizer, scaler, None, cpu, 1, compiled) for b in batches]
        losses = torch.stack([torch.stack(list(s.values())) for s in steps])
        runs[compiled] = losses, model.state_dict()
        if compiled:
            assert counter.frame_count == 1
    (eager, eager_weights), (fast, fast_weights) = runs[False], runs[True]
    assert eager[0, 0] != eager[2, 0]  # the steps trained: later losses differ
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)
    for k, v in eager_weights.items():
        torch.testing.assert_close(fast_weights[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_steps_never_wait_for_it_and_compiled_bf16_matches_eager():
    """On CUDA, bf16: after the first step (compilation) train_step makes no host-device sync (CUDA's
    sync debug mode raises on any: an .item(), a nonzero, a blocking copy), eager or compiled with
    inductor; and the compiled losses match the eager ones within bf16's precision."""
    import bench
    import numpy as np
    cuda = torch.device("cuda")
    cfg = MRMConfig.from_preset("tiny", vocab_size=150)
    rng = np.random.default_rng(0)
    batches = [{k: v.pin_memory() for k, v in bench.synthetic_batch(cfg, 8, rng).items()} for _ in range(4)]
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MRM(cfg).to(cuda)
        optimizer = recipes.pretraining_optimizer(model, 0.05, cuda)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        net = torch.compile(model) if compiled else model
        losses = []
        for i, b in enumerate(batches):
            torch.cuda.set_sync_debug_mode("error" if i > 0 else "default")
            try:
                losses.append(torch.stack(list(train.train_step(net, None, [b], optimizer, scaler, torch.bfloat16, cuda,
                                                                1, compiled).values())))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        runs[compiled] = torch.stack(losses).cpu()
    assert torch.isfinite(runs[False]).all()
    torch.testing.assert_close(runs[True], runs[False], rtol=2e-2, atol=2e-2)


def test_a_synthetic_run_ends_with_the_fusion_check(tmp_path, capsys):
    train.main([*SMALL, "--out", str(tmp_path), "--fusion_check", "12"])
    last = log(tmp_path)[-1]["fusion_check"]
    assert last["records"] == 12
    for group in ("image_only", "side", "size", "presence", "all", "with_twin"):
        assert set(last[group]) == {"film", "noise", "other_film", "count"} and 0 <= last[group]["film"] <= 1
    assert last["all"]["count"] > last["image_only"]["count"] > 0
    assert last["pooled_spread"]["random"] > 0.05 and last["pooled_spread"]["trained"] >= 0
    out = capsys.readouterr().out
    assert "only the film can tell" in out and "a random encoder" in out
    # a resumed run drops the old check with the steps after its checkpoint, and writes its own at its end
    train.main(["--resume", str(tmp_path / "ckpt.pt"), "--epochs", "3"])
    lines = log(tmp_path)
    assert ["fusion_check" in line for line in lines].count(True) == 1 and "fusion_check" in lines[-1]


def test_fusion_every_draws_the_check_as_a_curve_that_a_resumed_run_keeps(tmp_path, capsys):
    """--fusion_every 1 over 3 epochs: a check after epochs 1 and 2 (tagged with their epoch and step)
    and the end's; resumed from epoch 2, the run keeps the two earlier checks and writes its own end."""
    train.main([*SMALL, "--out", str(tmp_path), "--epochs", "3", "--fusion_check", "8", "--fusion_every", "1",
                "--save_every", "2"])
    checks_ = [line["fusion_check"] for line in log(tmp_path) if "fusion_check" in line]
    assert [(c["epoch"], c["step"]) for c in checks_] == [(1, 4), (2, 8), (3, 12)]
    assert [line.get("epoch") for line in log(tmp_path) if "fusion_check" in line] == [1, 2, None]
    assert capsys.readouterr().out.count("only the film can tell") == 3
    train.main(["--resume", str(tmp_path / "ckpt.pt"), "--epochs", "4"])  # ckpt.pt is epoch 3's (the end)
    assert [line["fusion_check"]["epoch"] for line in log(tmp_path) if "fusion_check" in line] == [1, 2, 4]


def test_the_demo_keeps_left_and_right_the_paper_run_mirrors():
    assert recipes.fill_pretraining(train.TrainConfig()).hflip is False
    assert recipes.fill_pretraining(train.TrainConfig(preset="base")).hflip is True
    assert recipes.fill_pretraining(train.TrainConfig(hflip=True)).hflip is True


def test_dry_run_resolves_the_recipe_without_reading_images(tmp_path, capsys, monkeypatch):
    with open(tmp_path / "training.csv", "w", newline="") as f:  # images that do not exist: never opened
        csv.writer(f).writerows([("image_path", "report_content")]
                                + [(f"missing/{i}.jpg", "FINDINGS: x.") for i in range(2600)])
    monkeypatch.setenv("WORLD_SIZE", "4")
    train.main(["--dry_run", "--preset", "base", "--data", str(tmp_path / "training.csv"),
                "--out", str(tmp_path / "o")])
    plan = json.loads(capsys.readouterr().out)
    assert plan["records"] == 2600 and plan["processes"] == 4 and plan["effective_batch"] == 256
    assert plan["lr"] == pytest.approx(1.5e-4) and plan["steps_per_epoch"] == 10  # 2,600 / 4 / 64
    assert plan["total_steps"] == 2000 and plan["warmup_steps"] == 400 and plan["crop"] == 448
    assert plan["model"]["embed_dim"] == 768 and not (tmp_path / "o").exists()
    monkeypatch.delenv("WORLD_SIZE")
    train.main(["--dry_run", "--accum_iter", "2"])  # the demo
    plan = json.loads(capsys.readouterr().out)
    assert plan["effective_batch"] == 64 and plan["steps_per_epoch"] == 32 and plan["lr"] == pytest.approx(1.5e-2 / 4)
