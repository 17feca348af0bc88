"""Checkpoints are checked before anything is built from them (checkpoints.py): a damaged or hand-made file
is refused as one line naming the file and the field, what was expected and what was found, never a
traceback from inside a resumed run, nor a model built until the machine runs out of memory."""
import copy
import os
import pathlib
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from machinery import checkpoints
import train
from machinery.checkpoints import CheckpointError, load_checkpoint, load_pretrained, read_checkpoint
from machinery.errors import ConfigError
from mrm import MRM, MRMConfig, ViT

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--num_records", "16", "--batch_size", "4", "--epochs", "1", "--num_workers", "0", "--fusion_check", "0"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A real train.py checkpoint of the tiny model, made once for the module."""
    out = tmp_path_factory.mktemp("run")
    train.main([*SMALL, "--out", str(out)])
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def state(good) -> dict:
    return torch.load(good, weights_only=True)


def corrupt(state: dict, path: Path, change) -> Path:
    """A copy of the good checkpoint with one field changed by `change(ckpt)`, saved at `path`."""
    ckpt = copy.deepcopy(state)
    change(ckpt)
    torch.save(ckpt, path)
    return path


def one_line_refusal(path: Path) -> str:
    """`python train.py --resume path`, as a user runs it: exit status 2 and one line on stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "train.py", "--resume", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("train.py: error: "), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_the_good_checkpoint_passes(good, state):
    assert load_checkpoint(good)["step"] == state["step"] == 4


# ----------------------------------------------------------------------------- 1. every field of --resume

def _set(key, value):
    return lambda c: c.update({key: value})


def _set_in(key, sub, value):
    return lambda c: c[key].update({sub: value})


BAD_FIELDS = {
    "config a list": (lambda c: c.update(config=list(c["config"])), "config: expected dict, found list"),
    "epoch a string": (_set("epoch", "three"), "epoch: expected int, found 'three'"),
    "epoch negative": (_set("epoch", -1), "epoch: expected an integer >= 0, found -1"),
    "step a float": (_set("step", 4.0), "step: expected int, found float"),
    "step a bool": (_set("step", True), "step: expected int, found bool"),
    "world_size 0": (_set("world_size", 0), "world_size: expected an integer >= 1, found 0"),
    "world_size a string": (_set("world_size", "2"), "world_size: expected an integer >= 1, found '2'"),
    "no rng": (lambda c: c.pop("rng"), r"not a train.py checkpoint \(lacks \['rng'\]\)"),
    "model_config a list": (_set("model_config", [1]), "model_config: expected dict, found list"),
    "num_heads 0": (_set_in("model_config", "num_heads", 0), "model_config: num_heads must be positive, got 0"),
    "embed_dim -8": (_set_in("model_config", "embed_dim", -8), "model_config: embed_dim must be positive, got -8"),
    "heads do not divide": (_set_in("model_config", "text_num_heads", 3),
                            "model_config: text_embed_dim 128 is not divisible by text_num_heads 3"),
    "depth a string": (_set_in("model_config", "depth", "6"), "model_config: depth must be int, got '6'"),
    "ratio a None": (_set_in("model_config", "mlp_ratio", None),
                     "model_config: mlp_ratio must be a finite number, got None"),
    "tokenizer not JSON": (_set("tokenizer", "{not json"), "tokenizer: expected a tokenizers JSON string"),
    "tokenizer a number": (_set("tokenizer", 5), "tokenizer: expected str, found int"),
    "another vocabulary": (_set_in("model_config", "vocab_size", 500), "tokenizer: its vocabulary size"),
    "wrong shape": (_set_in("model", "encoder.pos_embed", torch.zeros(1, 10, 192)),
                    r"model: encoder.pos_embed is \(1, 10, 192\), expected \(1, 65, 192\)"),
    "tensor missing": (lambda c: c["model"].pop("encoder.norm.weight"), "model: 1 missing: encoder.norm.weight"),
    "not a tensor": (_set_in("model", "encoder.norm.bias", [0.0] * 192), "model: encoder.norm.bias is a list"),
    "optimizer swapped": (_set("optimizer", {"state": [], "param_groups": {}}),
                          "optimizer: expected 'param_groups': a list of dicts"),
    "optimizer short": (lambda c: c["optimizer"]["param_groups"][0]["params"].pop(),
                        "optimizer: expected 'param_groups' to name"),
    "optimizer state": (_set_in("optimizer", "state", []), "optimizer: expected 'state': a dict"),
    "scaler a list": (_set("scaler", []), "scaler: expected dict, found list"),
    "scaler a string": (_set("scaler", {"scale": "x"}), "scaler: expected {} or numbers"),
    "rng a tensor": (_set("rng", torch.get_rng_state()), "rng: expected dict, found torch.uint8 tensor"),
    "rng of floats": (_set_in("rng", "torch", torch.zeros(5056)), "rng: expected 'torch': a uint8 tensor"),
    "no cuda rng": (lambda c: c["rng"].pop("cuda"), "rng: expected 'cuda': None or a uint8 tensor"),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_each_malformed_field_is_refused_naming_it(state, tmp_path, case):
    change, says = BAD_FIELDS[case]
    path = corrupt(state, tmp_path / "bad.pt", change)
    with pytest.raises(CheckpointError, match=r"^" + re.escape(str(path)) + ": " + says) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["config a list", "num_heads 0", "wrong shape"])
def test_the_command_line_says_it_in_one_line(state, tmp_path, case):
    change, says = BAD_FIELDS[case]
    path = corrupt(state, tmp_path / "bad.pt", change)
    assert re.search(re.escape(str(path)) + ": " + says, one_line_refusal(path))


# ----------------------------------------------------------------------------- 2. settings in range, size bounded

@pytest.mark.parametrize("setting, says", [
    (dict(img_size=60), "img_size 60 is not a multiple of patch_size 8"),
    (dict(decoder_num_heads=3), "decoder_embed_dim 128 is not divisible by decoder_num_heads 3"),
    (dict(embed_dim=198, num_heads=3), "embed_dim must be a multiple of 4"),
    (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
    (dict(mask_token_id=30000), r"mask_token_id 30000 is not an id of the vocabulary \(0 to 29999\)"),
    (dict(max_text_len=0), "max_text_len must be positive, got 0"),
    (dict(pixel_std=float("nan")), "pixel_std must be a finite number, got nan"),
    (dict(super_resolution=1), "super_resolution must be bool, got 1"),
    (dict(fusion="mean"), "fusion must be 'gap' or 'gmp'"),
])
def test_config_settings_are_checked_in_one_place(setting, says):
    with pytest.raises(ConfigError, match=says):
        checkpoints.check_model_config(MRMConfig.from_preset("tiny", **setting))
    with pytest.raises(ConfigError, match=says):
        checkpoints.check_model_config(MRMConfig.from_dict({**MRMConfig.from_preset("tiny").to_dict(), **setting}))


@pytest.mark.parametrize("setting", [{}, dict(mlm_weight=0), dict(mim_weight=0, mlp_ratio=2.5, super_resolution=False),
                                     dict(multimodal_mim=True, in_chans=1, img_size=48, patch_size=16),
                                     dict(decoder_depth=0, vocab_size=7)])
def test_parameter_count_by_formula_is_the_models(setting):
    # the count comes from the model built on the meta device: a layer added to mrm.py is counted with it
    cfg = MRMConfig.from_preset("tiny", **setting)
    model = MRM(cfg)
    assert checkpoints.num_parameters(cfg) == sum(p.numel() for p in model.parameters())
    state, trainable = checkpoints.expected_state(cfg)  # what a resumed checkpoint is checked against
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert trainable == sum(p.requires_grad for p in model.parameters())


def test_parameter_count_of_the_base_model():
    cfg = MRMConfig()
    state, _ = checkpoints.expected_state(cfg)  # the meta device: nothing allocated
    assert checkpoints.num_parameters(cfg) == sum(v.numel() for v in state.values()) == 151_308_720  # 30,000 words


@pytest.mark.parametrize("setting", [dict(depth=200_000), dict(embed_dim=49152)])
def test_an_absurd_model_is_refused_at_once(state, tmp_path, setting):
    path = corrupt(state, tmp_path / "huge.pt", lambda c: c["model_config"].update(setting))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"huge.pt: model_config describes a model of [\d.e+]+ parameters, "
                                              r"past the 2e\+09 loaded without --trust_checkpoint"):
        load_checkpoint(path)
    assert time.perf_counter() - start < 5  # the time to read the file, not to build the model
    if "depth" in setting:
        assert "huge.pt: model_config describes" in one_line_refusal(path)


def test_trust_lifts_the_size_bound(good, monkeypatch):
    monkeypatch.setattr(checkpoints, "MAX_PARAMETERS", 1000)
    with pytest.raises(CheckpointError, match="past the 1e\\+03"):
        load_checkpoint(good)
    assert load_checkpoint(good, trust=True)["epoch"] == 1


# ----------------------------------------------------------------------------- 3. weight dtypes

@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64])
def test_non_floating_weights_are_refused(tmp_path, dtype):
    sd = ViT(32, 8, 3, 64, 1, 4).state_dict()
    sd["blocks.0.norm1.weight"] = sd["blocks.0.norm1.weight"].to(dtype)
    torch.save({"model": sd}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match=rf"weights.pth: blocks.0.norm1.weight: expected a floating-point "
                                              rf"tensor, found {dtype}"):
        load_pretrained(ViT(32, 8, 3, 64, 1, 4), tmp_path / "weights.pth", verbose=False)


def test_half_precision_weights_load(tmp_path):
    src = ViT(32, 8, 3, 64, 1, 4)
    sd = {k: v.to(torch.bfloat16 if "blocks" in k else torch.float16) for k, v in src.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "half.pth")
    dst = ViT(32, 8, 3, 64, 1, 4)
    assert load_pretrained(dst, tmp_path / "half.pth", verbose=False)["missing"] == []
    assert dst.norm.weight.dtype == torch.float32 and torch.equal(dst.norm.weight, sd["norm.weight"].float())


def test_non_floating_weights_are_refused_on_resume(state, tmp_path):
    path = corrupt(state, tmp_path / "bad.pt", lambda c: c["model"].update(
        {"encoder.norm.weight": c["model"]["encoder.norm.weight"].to(torch.complex64)}))
    with pytest.raises(CheckpointError, match=r"bad.pt: model: encoder.norm.weight is torch.complex64, "
                                              r"expected floating point"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- 4. ranks before reshapes

@pytest.mark.parametrize("table", [torch.zeros(17 * 64), torch.zeros(2, 17, 64), torch.zeros(1, 0, 64),
                                   torch.zeros(1, 1, 64)])
def test_a_position_table_of_another_rank_is_reported_not_reshaped(tmp_path, table):
    sd = ViT(32, 8, 3, 64, 1, 4).state_dict()
    sd["pos_embed"] = table
    torch.save({"model": sd}, tmp_path / "init.pth")
    report = load_pretrained(ViT(64, 8, 3, 64, 1, 4), tmp_path / "init.pth", verbose=False)  # another grid
    assert report["mismatched"] == [f"pos_embed: checkpoint {tuple(table.shape)} vs model (1, 65, 64)"]
    assert report["missing"] == ["pos_embed"] and report["resized"] == []


# ----------------------------------------------------------------------------- 5. zip bombs

def test_a_compressed_entry_is_refused_before_loading(tmp_path, monkeypatch):
    plain, bomb = tmp_path / "plain.pt", tmp_path / "bomb.pt"
    torch.save({"model": {"w": torch.zeros(1_000_000)}}, plain)  # a 4 MB storage of zeros
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w") as dst:  # the same archive, storages deflated
        for info in src.infolist():
            packed = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info), compress_type=packed)
    assert bomb.stat().st_size < 10_000  # what a 1 GiB storage does at 1 MB, in small
    assert torch.load(bomb, weights_only=True)["model"]["w"].numel() == 1_000_000  # torch would expand it
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    for trust in (False, True):
        with pytest.raises(CheckpointError, match=r"bomb.pt: refused: entry plain/data/0 is compressed \(method 8, "
                                                  r"\d+ -> 4000000 bytes\); torch.save writes entries uncompressed"):
            read_checkpoint(bomb, trust)
    assert calls == []
    checkpoints.refuse_compressed_entries(plain)  # what torch.save wrote passes


# ----------------------------------------------------------------------------- 6. the legacy format

def test_legacy_format(tmp_path, capsys):
    weights = ViT(32, 8, 3, 64, 1, 4).state_dict()
    plain, odd = tmp_path / "plain.pth", tmp_path / "odd.pth"
    torch.save({"model": weights, "epoch": 3}, plain, _use_new_zipfile_serialization=False)
    torch.save({"model": weights, "dir": pathlib.PurePosixPath("runs")}, odd, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(plain)
    # tensors and plain values load safely in the old format too
    assert load_pretrained(ViT(32, 8, 3, 64, 1, 4), plain, verbose=False)["missing"] == []
    says = r"odd.pth: refused: a legacy \(pre-1.6 torch.save, not zip\) file that pickles at least pathlib"
    with pytest.raises(CheckpointError, match=says + r"\.PurePosixPath, .*--trust_checkpoint") as e:
        read_checkpoint(odd)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
    assert read_checkpoint(odd, trust=True)["dir"] == pathlib.PurePosixPath("runs")


# ----------------------------------------------------------------------------- 7. other scripts' own checkpoints

# what finetune.py's last.pt holds (fit, save_checkpoint(last_path, ...)), checked when it resumes
FINETUNE_LAST = dict(model=dict, optimizer=dict, scaler=dict, step=int, best=dict, config=dict, rng=torch.Tensor)


@pytest.mark.parametrize("change, says", [
    (lambda c: c.pop("config"), r"last.pt: lacks \['config'\]"),
    (lambda c: c.update(config=[]), "last.pt: config: expected dict, found list"),
    (lambda c: c.update(rng=[0]), "last.pt: rng: expected Tensor, found list"),
])
def test_a_run_checkpoint_is_checked_for_its_fields(tmp_path, change, says):
    last = {"model": {}, "optimizer": {}, "scaler": {}, "step": 2, "best": {"val": 0.5}, "config": {"lr": 0.1},
            "rng": torch.get_rng_state(), "cuda_rng": None}
    torch.save(last, tmp_path / "last.pt")
    assert read_checkpoint(tmp_path / "last.pt", expect=FINETUNE_LAST)["step"] == 2
    change(last)
    torch.save(last, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=says):
        read_checkpoint(tmp_path / "last.pt", expect=FINETUNE_LAST)
