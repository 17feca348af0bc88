"""Checks of experiments/miniature.py at a tiny scale: what it writes, that a finished run is reused,
and that the fusion check really compares the radiograph with noise."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import miniature  # noqa: E402
from miniature import MiniConfig  # noqa: E402

SMALL = dict(pretrain_records=64, pretrain_epochs=1, finetune_records=200, val_records=60, test_records=60,
             steps=(2, 2, 3), seeds=2, check_records=20, variants=("mrm", "no_mlm", "scratch"))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("miniature")
    results = miniature.run(MiniConfig(**SMALL), str(root / "runs"), str(root / "results"), "mini", "test")
    return root, results


def test_writes_every_variant_ratio_and_seed(experiment):
    root, results = experiment
    with open(root / "results" / "mini.json") as f:
        saved = json.load(f)
    assert saved == results
    assert list(saved) == ["mrm", "no_mlm", "scratch"]
    for by_ratio in saved.values():
        assert list(by_ratio) == ["0.01", "0.1", "1.0"]
        for aucs in by_ratio.values():
            assert len(aucs) == 2 and all(0 <= a <= 1 for a in aucs)
    md = (root / "results" / "mini.md").read_text()
    assert "| mrm |" in md and "| scratch |" in md and "±" in md
    with open(root / "results" / "mini_checks.json") as f:
        checks = json.load(f)
    # a report decoder only in mrm; no_mlm has none to check, scratch was never pre-trained
    assert list(checks["fusion_check"]) == ["mrm"]
    assert set(checks["pooled_spread"]) == {"mrm", "no_mlm"}
    count = {g: v["count"] for g, v in checks["fusion_check"]["mrm"].items()}
    assert count["all"] == sum(count[g] for g in list(miniature.checks.WORD_GROUPS) + ["other"]) > 0
    assert count["side"] > 0 and count["size"] > 0
    assert count["image_only"] + count["with_twin"] == count["side"] + count["size"] + count["zone"]
    # a linear probe of every encoder, the random one (scratch) included, at every ratio and seed
    assert set(checks["linear_probe"]) == {"mrm", "no_mlm", "scratch"}
    for by_ratio in checks["linear_probe"].values():
        assert list(by_ratio) == ["0.01", "0.1", "1.0"] and all(len(v) == 2 for v in by_ratio.values())
    assert "Linear probe" in md and "image_only" in md
    # each fine-tuning run keeps its results and log, not its weights
    kept = {f for _, _, files in os.walk(root / "runs" / "mrm" / "finetune_0.01_seed0") for f in files}
    assert "results.json" in kept and "log.jsonl" in kept and not kept & {"best.pt", "last.pt"}
    # LP-FT: each run's head starts as a linear probe, validated before the first step
    with open(root / "runs" / "mrm" / "finetune_0.01_seed0" / "lr_0.1" / "log.jsonl") as f:
        assert json.loads(f.readline())["step"] == 0


def test_pretraining_follows_the_variant(experiment):
    root, _ = experiment
    for variant, mlm, sr in (("mrm", 1.0, True), ("no_mlm", 0.0, True)):
        ckpt = torch.load(root / "runs" / variant / "pretrain" / "ckpt.pt", map_location="cpu", weights_only=False)
        assert ckpt["model_config"]["mlm_weight"] == mlm and ckpt["model_config"]["super_resolution"] == sr
        assert ckpt["config"]["hflip"] is False and ckpt["model_config"]["fusion_tokens"] == "visible"
    assert not (root / "runs" / "scratch" / "pretrain").exists()


def test_finished_runs_are_reused(experiment, monkeypatch):
    root, results = experiment

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(miniature.train, "train", fail)
    monkeypatch.setattr(miniature.finetune, "finetune", fail)
    again = miniature.run(MiniConfig(**SMALL), str(root / "runs"), str(root / "again"), "mini", "test")
    assert again == results


def test_pretraining_with_other_settings_is_refused(experiment, tmp_path):
    root, _ = experiment
    with pytest.raises(ValueError, match="other settings"):
        miniature.pretrain("mrm", MiniConfig(**{**SMALL, "blr": 1e-3}), str(root / "runs"))
    # a stopped one too, instead of resuming it with the new settings
    ckpt = torch.load(root / "runs" / "mrm" / "pretrain" / "ckpt.pt", map_location="cpu", weights_only=False)
    ckpt["epoch"] = 0
    (tmp_path / "mrm" / "pretrain").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "mrm" / "pretrain" / "ckpt.pt")
    with pytest.raises(ValueError, match="other settings"):
        miniature.pretrain("mrm", MiniConfig(**{**SMALL, "blr": 1e-3}), str(tmp_path))


def test_check_of_a_checkpoint(experiment, tmp_path):
    """--check's helper: with the fusion projection zeroed, no image reaches the report decoder, so the
    radiograph and the noise restore the same words (both conditions share their text and image masks)."""
    root, _ = experiment
    path = root / "runs" / "mrm" / "pretrain" / "ckpt.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("fusion_proj.weight", "fusion_proj.bias"):
        ckpt["model"][key] = torch.zeros_like(ckpt["model"][key])
    cut = tmp_path / "ckpt.pt"
    torch.save(ckpt, cut)
    blind, spread = miniature.check(str(cut), 2_000_000, 12)
    assert all(v["film"] == v["noise"] for v in blind.values()) and spread > 0
    seeing, _ = miniature.check(str(path), 2_000_000, 12)
    assert {g: v["count"] for g, v in seeing.items()} == {g: v["count"] for g, v in blind.items()}  # same masks
    assert miniature.check(str(root / "runs" / "no_mlm" / "pretrain" / "ckpt.pt"), 2_000_000, 12)[0] is None


def test_table_shows_mean_and_std():
    text = miniature.table({"mrm": {"0.01": [0.5, 0.7], "0.1": [0.6, 0.6], "1.0": [0.9, 0.7]}})
    assert text.splitlines()[-1] == "| mrm | 60.0 ± 10.0 | 60.0 ± 0.0 | 80.0 ± 10.0 |"
