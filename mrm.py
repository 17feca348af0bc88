"""Masked Record Modeling (MRM, Zhou et al., ICLR 2023), the whole pre-training model in one file.

A record is a chest radiograph and its free-text report. MRM masks both and asks one image encoder
to serve two restorations (Fig. 2):
  * L_I: restore the masked patches of the radiograph at twice the input resolution (Sec. 3.2, Eq. 2);
  * L_R: restore the masked words of the report from the visible words plus a global image feature
    added to each of them, the "hybrid" tokens (Sec. 3.1, Eq. 1).
The total is L = L_R + lambda * L_I (Eq. 3). After pre-training only the encoder (a ViT-B/16) is kept.

Read top to bottom: the sizes (MRMConfig), helpers (patches, sin-cos tables, masking), the transformer
parts, the encoder, the two decoders, the losses, and MRM itself last. Sizes come from App. A.2 and
the released model_mrm.py.
Convention used everywhere: L patches on a G x G grid, mask = 1 where a patch was removed.
"""
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Sizes and switches: every part below reads its sizes from here


@dataclass
class Switches:
    """What the method does, the ablations of Tables 4 and 5; train.py's flags of the same names."""
    mask_ratio: float = 0.75         # of the image patches removed (Table 5b)
    mim_weight: float = 1.0          # lambda of Eq. 3 on L_I (Table 5c); 0 = report restoration only
    mlm_weight: float = 1.0          # weight of L_R; 0 = self-supervision only (Table 4)
    super_resolution: bool = True    # restore 2x patches (Sec. 3.2); off: restore the input patches
    fusion: str = "gap"              # global average (gap) or max (gmp) pooling of the image feature (Table 5a)
    fusion_tokens: str = "visible"   # tokens given the image feature: visible (paper) or all, [MASK] too (released)
    norm_pix_loss: bool = False      # normalise each target patch (the released run script's choice)
    multimodal_mim: bool = False     # add the report's mean embedding to the image decoder input (Table 4)


@dataclass
class MRMConfig(Switches):
    """Every size and switch of the model; MRMConfig() is the paper's base model (App. A.2)."""

    # image encoder: ViT-B/16 on the 224 low-res input (the high-res image is 2 * img_size)
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # image decoder
    decoder_embed_dim: int = 768
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    # report decoder and tokens (the released WordPiece: [PAD]=0 [UNK]=1 [CLS]=2 [MASK]=3)
    text_embed_dim: int = 384
    text_depth: int = 6
    text_num_heads: int = 6
    vocab_size: int = 30000
    max_text_len: int = 100
    pad_token_id: int = 0
    mask_token_id: int = 3
    pixel_mean: float = 0.4978     # input normalisation, one value for the three equal channels of a radiograph
    pixel_std: float = 0.2449

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MRMConfig":
        """'base' (these defaults) or 'tiny' (PRESETS), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "MRMConfig":
        """Rebuild from a checkpoint's plain dict, ignoring (and naming) keys this version does not know."""
        known = {f.name for f in fields(cls)}
        unknown = d.keys() - known - {"text_mask_ratio"}  # a data setting, kept here by older checkpoints
        if unknown:
            print(f"MRMConfig: ignoring unknown keys {sorted(str(k) for k in unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


# --preset: base is the paper's model; tiny the CPU demos' and tests' (128-px high-res, 64-px input, 8-px patches)
PRESETS = {
    "base": {},
    "tiny": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128,
                 decoder_depth=2, decoder_num_heads=4, text_embed_dim=128, text_depth=2, text_num_heads=4),
}


# -----------------------------------------------------------------------------
# Patches and positions


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: (B, C, H, W) -> (B, L, p*p*C), patches in raster order, values in (row, column, channel)
    order: the layout the official decoder's output Linear assumes, so its weights load unchanged."""
    B, C, H, W = imgs.shape
    assert H % p == 0 and W % p == 0, f"image {H}x{W} is not a multiple of the patch size {p}"
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """x: (B, L, p*p*C) -> (B, C, H, W); the inverse of patchify for a square grid."""
    B, L, _ = x.shape
    g = math.isqrt(L)
    assert g * g == L, f"{L} patches do not form a square grid"
    x = x.reshape(B, g, g, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, channels, g * p, g * p)


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: (M,) -> (M, embed_dim): sin(pos * w_k) for the first half, cos(pos * w_k) for the second,
    with w_k = 1 / 10000^(k / (embed_dim / 2)), k = 0 .. embed_dim/2 - 1 (Transformer / MAE formula)."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """The fixed 2D table of MAE: (G*G, D), or (1 + G*G, D) with a zero row first for [CLS]. Patch
    i = r * G + c gets the 1D code of its column c in the first D/2 channels and of its row r in
    the last D/2 (MAE's meshgrid puts the column coordinate first). The released helper (model_mrm.py)
    divides the exponent by 2*D instead of D/2; we use MAE's formula, which its weights were trained with."""
    assert embed_dim % 4 == 0, "2D sin-cos needs a width divisible by 4"
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, cols),
                          get_1d_sincos_pos_embed(embed_dim // 2, rows)], axis=1)  # (G*G, D)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb.astype(np.float32)


def random_masking(batch_size: int, num_patches: int, mask_ratio: float, device=None, generator=None, noise=None):
    """Per-sample random removal of mask_ratio of the patches (Sec. 3.2, following MAE): sorting uniform
    noise gives a random permutation per sample, and the first int(L * (1 - r)) are kept. `noise` (B, L)
    may be given (the data pipeline draws it per record, so a record's mask does not depend on its batch
    or process); otherwise it is drawn from `generator`. Returns ids_keep (B, K), mask (B, L) with
    1 = removed, and ids_restore (B, L), the permutation that puts [kept, removed] back in raster order."""
    len_keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        # draw on the generator's own device, so one seeded CPU generator gives the same masks on any device
        noise = torch.rand(batch_size, num_patches, generator=generator,
                           device=generator.device if generator is not None else device)
    if tuple(noise.shape) != (batch_size, num_patches):
        raise ValueError(f"mask noise must be ({batch_size}, {num_patches}), got {tuple(noise.shape)}")
    noise = noise.to(device)  # (B, L)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to raster order
    return ids_keep, mask, ids_restore


# -----------------------------------------------------------------------------
# Transformer parts (ViT, Dosovitskiy et al. 2021; names follow timm so official weights load)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a residual branch for whole samples (used in fine-tuning only)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, D/heads)
        # attn_mask: None or bool (B, 1, 1, N), True where a key may be attended (report padding)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as ViT and BERT


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_prob: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_prob = drop_prob

    def forward(self, x, attn_mask=None):
        x = x + drop_path(self.attn(self.norm1(x), attn_mask), self.drop_prob, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training)


class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each linearly: a conv with stride p."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D), raster order like patchify


def init_weights(m: nn.Module):
    """The released init (MAE's, model_mrm.py): xavier-uniform Linears with zero bias, LayerNorm 1/0,
    token embeddings normal(0, 0.02)."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


# -----------------------------------------------------------------------------
# The image encoder: a standard ViT that can also encode only the visible patches


class ViT(nn.Module):
    """ViT-B/16 by default. forward returns the post-norm tokens (B, 1 + L, D), [CLS] first. Parameter names
    are MAE's and the released MRM's: their state dicts load strictly, unrenamed (no head: fine-tuning's)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        self.img_size, self.patch_size, self.grid_size = img_size, patch_size, img_size // patch_size
        self.num_patches = self.grid_size**2
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed, not learned (Sec. 3.2); a frozen Parameter so checkpoints carry it under MAE's name
        table = get_2d_sincos_pos_embed(embed_dim, self.grid_size, cls_token=True)
        self.pos_embed = nn.Parameter(torch.from_numpy(table).unsqueeze(0), requires_grad=False)
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # deeper blocks drop more
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight  # xavier on the flattened (D, C*p*p) matrix, as a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) normalised image; ids_keep: (B, K) indices of the patches to encode, or None.
        Returns the input tokens (B, 1 + K, D), [CLS] first."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ViT expects {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, L, D)
        if ids_keep is not None:  # MRM: only the visible low-res patches enter the encoder
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)  # (B, 1 + K, D)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x, ids_keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def hidden_states(self, x: torch.Tensor, after: list[int]) -> list[torch.Tensor]:
        """Fine-tuning: the tokens (B, 1 + L, D) after each block in `after` (1-based), before the final
        norm (classification pools first and normalises after; segmentation taps blocks 4, 6, 8, 12)."""
        x, out = self.embed(x), []
        for k, block in enumerate(self.blocks[:max(after)], start=1):
            x = block(x)
            if k in after:
                out.append(x)
        return out


# -----------------------------------------------------------------------------
# The two decoders and the fusion between image and report


class ImageDecoder(nn.Module):
    """MAE-style decoder that restores every patch position at twice the resolution (Sec. 3.2): visible latents
    projected, a learned mask token in the removed positions, the fixed sin-cos table, 4 blocks, one Linear to
    a (2p)^2 * C high-res patch per position. The official `decoder_*` / `mask_token` names, prefixed."""

    def __init__(self, cfg: MRMConfig):
        super().__init__()
        d = cfg.decoder_embed_dim
        out_p = 2 * cfg.patch_size if cfg.super_resolution else cfg.patch_size
        self.decoder_embed = nn.Linear(cfg.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        table = get_2d_sincos_pos_embed(d, cfg.img_size // cfg.patch_size, cls_token=True)
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(table).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(d, cfg.decoder_num_heads, cfg.mlp_ratio)
                                             for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, out_p * out_p * cfg.in_chans)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent, ids_restore, text_feature=None):
        """latent: (B, 1 + K, D) encoder output; ids_restore: (B, L); text_feature: (B, d) or None.
        Returns (B, L, (2p)^2 * C), a prediction for every position (the loss keeps the masked ones)."""
        x = self.decoder_embed(latent)  # (B, 1 + K, d)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L - (x.shape[1] - 1), -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, d) in [kept, removed] order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # raster order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        if text_feature is not None:  # ablation "multi-modal image restoration" (Table 4)
            x = x + text_feature.unsqueeze(1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop [CLS]


def global_pool(patch_tokens: torch.Tensor, fusion: str = "gap") -> torch.Tensor:
    """(B, K, D) visible patch tokens -> (B, D) global radiograph feature: average (GAP, the paper's
    choice) or max (GMP, Table 5a). [CLS] is not part of the pool."""
    if fusion == "gap":
        return patch_tokens.mean(dim=1)
    if fusion == "gmp":
        return patch_tokens.amax(dim=1)
    raise ValueError(f"fusion must be 'gap' or 'gmp', got {fusion!r}")


class ReportDecoder(nn.Module):
    """Light transformer that restores masked report tokens from hybrid tokens (Sec. 3.1, App. A.2). Token
    embedding + learned position embedding (A.2 says learnable, Sec. 3.1 fixed; A.2 and the released code
    agree on learned), a LayerNorm, the image feature added to every visible real token, 6 pre-norm blocks,
    LayerNorm, one Linear to the vocabulary. Padding is hidden from attention, as BERT's mask does. The
    embedding LayerNorm is BERT's (the released decoder added the image feature after it): it puts the words
    at unit scale beside the image feature, which otherwise, at about 50x the size of a normal(0, 0.02)
    embedding, drowns which word is where until the embeddings grow."""

    def __init__(self, cfg: MRMConfig):
        super().__init__()
        d = cfg.text_embed_dim
        self.pad_token_id, self.mask_token_id = cfg.pad_token_id, cfg.mask_token_id
        self.fuse_masked = cfg.fusion_tokens == "all"
        self.token_embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_text_len, d))
        self.embed_norm = nn.LayerNorm(d, eps=1e-6)
        self.blocks = nn.ModuleList([Block(d, cfg.text_num_heads, cfg.mlp_ratio) for _ in range(cfg.text_depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.vocab_size)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    def visible(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) bool, True at the real, visible tokens (not [MASK], not [PAD])."""
        return (tokens != self.mask_token_id) & (tokens != self.pad_token_id)

    def hybrid_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) bool, where the image feature is added: the visible tokens (the paper), or with
        fusion_tokens='all' every real token, [MASK] included (the released code). [PAD] never."""
        return tokens != self.pad_token_id if self.fuse_masked else self.visible(tokens)

    def embed(self, tokens):
        """(B, T) -> (B, T, d): token + position embedding, LayerNorm."""
        T = tokens.shape[1]
        if T > self.pos_embed.shape[1]:
            raise ValueError(f"report of {T} tokens is longer than max_text_len={self.pos_embed.shape[1]}")
        return self.embed_norm(self.token_embed(tokens) + self.pos_embed[:, :T])

    def mean_visible_embedding(self, tokens):
        """(B, T) -> (B, d): mean embedding of the visible real tokens (multi-modal image restoration)."""
        visible = self.visible(tokens).unsqueeze(-1)  # (B, T, 1)
        return (self.embed(tokens) * visible).sum(1) / visible.sum(1).clamp(min=1)

    def forward(self, tokens, image_feature, *, predict_at=None):
        """tokens: (B, T) ids with [MASK] in place; image_feature: (B, d). Returns logits (B, T, V), or
        (M, V) at predict_at only: a (B, T) bool mask, or (M,) positions in the flattened (B * T) tokens."""
        x = self.embed(tokens)  # (B, T, d)
        x = x + self.hybrid_positions(tokens).unsqueeze(-1) * image_feature.unsqueeze(1)  # hybrid tokens
        attn_mask = (tokens != self.pad_token_id)[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.norm(x)
        if predict_at is not None:  # the 30,000-word projection is the costly part: only where it is scored
            x = x[predict_at] if predict_at.dtype == torch.bool else x.flatten(0, 1)[predict_at]  # (M, d)
        return self.head(x)


# -----------------------------------------------------------------------------
# Losses


def mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = False):
    """Eq. 2: mean squared error per patch, averaged over the masked patches only. pred, target: (B, L, P),
    pixels in [0, 1]; mask: (B, L), 1 = removed (scored). norm_pix_loss: MAE's option (the released run
    script's) of scoring each target patch normalised by its own mean and variance."""
    target = target.float()
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, denominator=None) -> torch.Tensor:
    """Eq. 1: cross entropy of the masked tokens only, averaged over them (the released code averaged over
    all 100 positions, padding included). logits (M, V), targets (M,). denominator: divide the sum by this
    instead of M: the whole batch's count, when a batch is split over processes or steps (train.py)."""
    if denominator is not None:
        return F.cross_entropy(logits.float(), targets, reduction="sum") / denominator
    if targets.numel() == 0:  # the mean over no token is NaN: say why instead
        raise ValueError("no masked report token in the batch (labels are all -100): nothing to restore")
    return F.cross_entropy(logits.float(), targets)


# -----------------------------------------------------------------------------
# The whole model


class MRM(nn.Module):
    """Image encoder + image decoder (L_I) + fusion and report decoder (L_R), Fig. 2. A part whose loss
    weight is 0 is not built, so ablations train under DDP without unused parameters."""

    def __init__(self, cfg: MRMConfig | None = None):
        super().__init__()
        cfg = cfg or MRMConfig()
        # what no model can be built with (the scripts refuse it before, in one line: machinery/settings.py)
        assert int((cfg.img_size // cfg.patch_size) ** 2 * (1 - cfg.mask_ratio)) >= 1, "mask_ratio leaves no patch"
        assert cfg.mim_weight > 0 or cfg.mlm_weight > 0, "both losses are off: nothing to learn"
        assert cfg.fusion_tokens in ("visible", "all"), f"unknown fusion_tokens {cfg.fusion_tokens!r}"
        assert max(cfg.pad_token_id, cfg.mask_token_id) < cfg.vocab_size, "[PAD] or [MASK] is not in the vocabulary"
        self.cfg = cfg
        self.encoder = ViT(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth,
                           cfg.num_heads, cfg.mlp_ratio)
        self.image_decoder = ImageDecoder(cfg) if cfg.mim_weight > 0 else None
        if cfg.mlm_weight > 0:
            self.fusion_proj = nn.Linear(cfg.embed_dim, cfg.text_embed_dim)  # 768 -> 384
            self.report_decoder = ReportDecoder(cfg)
            init_weights(self.fusion_proj)
        else:
            self.fusion_proj = self.report_decoder = None
        if cfg.multimodal_mim:
            self.text_to_image = nn.Linear(cfg.text_embed_dim, cfg.decoder_embed_dim)
            init_weights(self.text_to_image)

    def prepare_images(self, images: torch.Tensor):
        """images: (B, C, 2H, 2W) high-res, floats in [0, 1] (or uint8, or one gray channel).
        Returns the high-res target image in [0, 1], the low-res one in [0, 1] and the normalised input."""
        cfg = self.cfg
        if images.dtype == torch.uint8:  # the data pipeline ships uint8 to save host-device bandwidth
            images = images.float() / 255
        hr, gray = 2 * cfg.img_size, images.ndim == 4 and images.shape[1] == 1 and cfg.in_chans == 3
        if images.ndim != 4 or tuple(images.shape[1:]) != (1 if gray else cfg.in_chans, hr, hr):
            raise ValueError(f"MRM expects high-res images (B, {cfg.in_chans} or 1, {hr}, {hr}), "
                             f"got {tuple(images.shape)}")
        # Sec. 3.2: sub-sample by 2. Bicubic with antialias on the [0, 1] image (the released code resized
        # the normalised tensor without antialias); clamp the small bicubic overshoot back into [0, 1].
        low = F.interpolate(images, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if gray:  # resized once, then repeated: the three channels of a radiograph are equal
            images, low = images.expand(-1, 3, -1, -1), low.expand(-1, 3, -1, -1)
        return images, low, (low - cfg.pixel_mean) / cfg.pixel_std

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor, *,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                mlm_denominator=None, mlm_index: torch.Tensor | None = None) -> dict:
        """images: (B, C, 2H, 2W) in [0, 1]; tokens: (B, T) with [MASK] in place; labels: (B, T), the
        original id where a token was masked, -100 elsewhere. Returns loss, loss_mim, loss_mlm, pred
        (B, L, (2p)^2 C), mask (B, L) and mlm_logits (M, V) at the M masked words, in labels' row-major order.
        train.train_step also passes the image mask's noise (random_masking), mlm_denominator (mlm_loss) and
        mlm_index, the masked words' flat positions, counted on the host."""
        cfg = self.cfg
        high, low, x = self.prepare_images(images)
        B, L = x.shape[0], self.encoder.num_patches
        ids_keep, mask, ids_restore = random_masking(B, L, cfg.mask_ratio, x.device, generator, noise)
        latent = self.encoder(x, ids_keep)  # (B, 1 + K, D), visible patches only
        zero = latent.new_zeros((), dtype=torch.float32)
        out = {"mask": mask, "loss_mim": zero, "loss_mlm": zero}

        text_feature = None
        if self.report_decoder is not None:  # report comprehension, Sec. 3.1
            image_feature = self.fusion_proj(global_pool(latent[:, 1:], cfg.fusion))  # (B, 384)
            if mlm_index is None:  # found on the GPU, nonzero makes the host wait: train.py counts them itself
                mlm_index = torch.nonzero(labels.flatten() != -100).squeeze(1)  # (M,)
            logits = self.report_decoder(tokens, image_feature, predict_at=mlm_index)  # (M, V)
            out.update(mlm_logits=logits, loss_mlm=mlm_loss(logits, labels.flatten()[mlm_index], mlm_denominator))
            if cfg.multimodal_mim:  # Table 4's variant: the report's mean visible embedding, 384 -> 768
                text_feature = self.text_to_image(self.report_decoder.mean_visible_embedding(tokens))

        if self.image_decoder is not None:  # radiograph understanding, Sec. 3.2
            pred = self.image_decoder(latent, ids_restore, text_feature)  # (B, L, (2p)^2 C)
            # the 2p x 2p patches of the high-res image on the same G x G grid (or, ablated, the input's)
            target = patchify(high, 2 * cfg.patch_size) if cfg.super_resolution else patchify(low, cfg.patch_size)
            # with mask_ratio 0 (Table 5b) nothing is removed: score every patch's super-resolution
            weight = mask if cfg.mask_ratio > 0 else torch.ones_like(mask)
            out.update(pred=pred, loss_mim=mim_loss(pred, target, weight, cfg.norm_pix_loss))

        out["loss"] = cfg.mlm_weight * out["loss_mlm"] + cfg.mim_weight * out["loss_mim"]  # Eq. 3
        return out

