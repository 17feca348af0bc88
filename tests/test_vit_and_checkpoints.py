"""The encoder is a standard ViT-B/16, and official checkpoints load into it by name."""
import argparse
import math
from pathlib import Path

import pytest
import torch

from machinery.checkpoints import load_pretrained
from mrm import MRM, MRMConfig, ViT


def standard_vit_b16_shapes(depth=12, D=768):
    """The names and shapes of a timm ViT-B/16 encoder as MAE's mae_pretrain_vit_base.pth holds them."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 197, D),
              "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,),
              "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,),
                       b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                       b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                       b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                       b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    return shapes


def official_decoder_shapes(D=768, depth=4):
    shapes = {"mask_token": (1, 1, D), "decoder_pos_embed": (1, 197, D),
              "decoder_embed.weight": (D, 768), "decoder_embed.bias": (D,),
              "decoder_norm.weight": (D,), "decoder_norm.bias": (D,),
              "decoder_pred.weight": (3072, D), "decoder_pred.bias": (3072,)}
    for k, v in standard_vit_b16_shapes(depth, D).items():
        if k.startswith("blocks."):
            shapes["decoder_" + k] = v
    return shapes


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def reference_vit(sd, x, num_heads, depth, ids_keep=None, patch=16):
    """A plain, independent ViT forward from a state dict: explicit LayerNorm, softmax attention, erf GELU."""
    def ln(t, pre):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True, unbiased=False)
        return (t - mu) / torch.sqrt(var + 1e-6) * sd[pre + ".weight"] + sd[pre + ".bias"]

    def lin(t, pre):
        return t @ sd[pre + ".weight"].T + sd[pre + ".bias"]

    B = x.shape[0]
    w = sd["patch_embed.proj.weight"]
    g = x.shape[-1] // patch
    # cut into patches in (channel, row, column) order to match the conv weight layout
    p = x.reshape(B, 3, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)
    t = p @ w.reshape(w.shape[0], -1).T + sd["patch_embed.proj.bias"] + sd["pos_embed"][:, 1:]
    if ids_keep is not None:
        t = torch.stack([t[b, ids_keep[b]] for b in range(B)])
    t = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(B, -1, -1), t], 1)
    D = t.shape[-1]
    hd = D // num_heads
    for i in range(depth):
        pre = f"blocks.{i}."
        h = lin(ln(t, pre + "norm1"), pre + "attn.qkv").reshape(B, -1, 3, num_heads, hd)
        q, k, v = h[:, :, 0].transpose(1, 2), h[:, :, 1].transpose(1, 2), h[:, :, 2].transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        t = t + lin(a.transpose(1, 2).reshape(B, -1, D), pre + "attn.proj")
        h = lin(ln(t, pre + "norm2"), pre + "mlp.fc1")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        t = t + lin(h, pre + "mlp.fc2")
    return ln(t, "norm")


def test_standard_vit_b16_state_dict_loads_strictly():
    shapes = standard_vit_b16_shapes()
    vit = ViT()
    assert {k: tuple(v.shape) for k, v in vit.state_dict().items()} == shapes
    vit.load_state_dict(random_state(shapes), strict=True)


def test_vit_b16_computes_the_standard_function():
    sd = random_state(standard_vit_b16_shapes(), seed=1)
    vit = ViT().eval()
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, ref = vit(x), reference_vit(sd, x, num_heads=12, depth=12)
    assert ours.shape == (1, 197, 768)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_vit_encodes_only_the_visible_patches():
    vit = ViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # make biases and norms non-trivial
    sd = vit.state_dict()
    x = torch.randn(2, 3, 32, 32)
    ids_keep = torch.tensor([[0, 5, 9, 15], [3, 2, 14, 7]])
    with torch.no_grad():
        assert torch.allclose(vit(x, ids_keep), reference_vit(sd, x, 4, 2, ids_keep, patch=8), atol=1e-5)
        assert torch.allclose(vit(x, torch.arange(16).expand(2, -1)), vit(x), atol=1e-6)
    with pytest.raises(ValueError, match="32x32"):
        vit(torch.randn(1, 3, 64, 64))


# ----------------------------------------------------------------------------- load_pretrained

def test_load_mae_checkpoint_with_pickled_namespace(tmp_path, capsys):
    sd = random_state(standard_vit_b16_shapes())
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model="mae_vit_base")}, path)
    vit = ViT()
    report = load_pretrained(vit, path)
    said = capsys.readouterr()
    assert "weights_only" not in said.out + said.err  # admitted by name: loaded safely, no warning
    assert report == {"missing": [], "unexpected": [], "mismatched": [], "resized": []}
    assert torch.equal(vit.blocks[11].mlp.fc2.weight, sd["blocks.11.mlp.fc2.weight"])


def test_load_released_mrm_into_encoder_and_into_mrm(tmp_path, capsys):
    # the released MRM.pth: encoder + image decoder under official names, a BERT report decoder
    sd = {**random_state(standard_vit_b16_shapes()), **random_state(official_decoder_shapes(), seed=2),
          "bert.embeddings.word_embeddings.weight": torch.zeros(30000, 384),
          "bert.encoder.layer.0.attention.self.query.weight": torch.zeros(384, 384)}
    path = tmp_path / "MRM.pth"
    torch.save({"model": sd}, path)

    vit = ViT()
    report = load_pretrained(vit, path)
    assert report["missing"] == [] and len(report["unexpected"]) == len(official_decoder_shapes()) + 2
    said = capsys.readouterr().out
    assert "decoder_blocks.{0-3}.attn.qkv.weight" in said  # listed exactly, but compactly

    mrm = MRM()
    report = load_pretrained(mrm, path)
    assert torch.equal(mrm.encoder.cls_token, sd["cls_token"])
    assert torch.equal(mrm.image_decoder.decoder_blocks[3].mlp.fc1.weight, sd["decoder_blocks.3.mlp.fc1.weight"])
    assert torch.equal(mrm.image_decoder.mask_token, sd["mask_token"])
    assert report["unexpected"] == ["bert.embeddings.word_embeddings.weight",
                                    "bert.encoder.layer.0.attention.self.query.weight"]
    assert report["missing"] and all(k.startswith(("report_decoder.", "fusion_proj.")) for k in report["missing"])


def test_own_checkpoint_round_trip_and_wrapper_prefixes(tmp_path):
    cfg = MRMConfig.from_preset("tiny", vocab_size=50)
    src = MRM(cfg)
    path = tmp_path / "ckpt.pt"
    # as a DDP-wrapped, compiled model would name them: prefixes must not leak into the result
    torch.save({"model": {"module._orig_mod." + k: v for k, v in src.state_dict().items()},
                "config": cfg.to_dict()}, path)
    dst = MRM(MRMConfig.from_dict(torch.load(path, weights_only=True)["config"]))
    assert load_pretrained(dst, path) == {"missing": [], "unexpected": [], "mismatched": [], "resized": []}
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    vit = ViT(cfg.img_size, cfg.patch_size, 3, cfg.embed_dim, cfg.depth, cfg.num_heads)
    report = load_pretrained(vit, path)  # the encoder alone, for fine-tuning
    assert report["missing"] == [] and torch.equal(vit.norm.weight, src.encoder.norm.weight)


def test_shape_mismatch_is_reported_and_skipped(tmp_path, capsys):
    sd = random_state(standard_vit_b16_shapes())
    path = tmp_path / "vit.pth"
    torch.save({"model": sd}, path)
    tiny = ViT(img_size=224, patch_size=16, embed_dim=768, depth=2, num_heads=12, in_chans=1)
    report = load_pretrained(tiny, path)
    assert report["mismatched"] == ["patch_embed.proj.weight: checkpoint (768, 3, 16, 16) vs model (768, 1, 16, 16)"]
    assert report["missing"] == ["patch_embed.proj.weight"]
    assert "blocks.{2-11}.attn.qkv.weight" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"not a checkpoint at all" * 10, b""])
def test_refuses_files_that_are_not_checkpoints(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="weights.pth: not a readable PyTorch checkpoint"):
        load_pretrained(ViT(), path)


def test_no_unsafe_retry_without_trust(tmp_path, monkeypatch, capsys):
    # junk, or a checkpoint pickling an object that is not allowlisted: one weights_only=True attempt, no retry
    junk, odd = tmp_path / "junk.pth", tmp_path / "odd.pth"
    junk.write_bytes(b"junk" * 10)
    torch.save({"model": ViT(32, 8, 3, 64, 1, 4).state_dict(), "extra": Path("x")}, odd)
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k))
    for path in (junk, odd):
        with pytest.raises(ValueError, match=path.name):
            load_pretrained(ViT(32, 8, 3, 64, 1, 4), path)
    assert calls == [True, True] and "weights_only=False" not in capsys.readouterr().out


def test_refuses_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": ViT(32, 8, 3, 64, 1, 4).state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pth: not a readable PyTorch checkpoint"):
        load_pretrained(ViT(32, 8, 3, 64, 1, 4), path)


def test_refuses_checkpoints_without_weights_for_the_model(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ValueError, match="other.pth: not a model checkpoint"):
        load_pretrained(ViT(), path)
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="none of its 1 tensors"):
        load_pretrained(ViT(), path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained(ViT(), tmp_path / "missing.pth")
