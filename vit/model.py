"""The Vision Transformer, written from the paper (Dosovitskiy et al., 2021, eqs. 1-4).

x_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          patchify, linear embed, class token, 1-D pos-embed
x'_l = MSA(LN(x_{l-1})) + x_{l-1}                        pre-LN attention block
x_l = MLP(LN(x'_l)) + x'_l                               pre-LN MLP block (GELU)
y = head(LN(x_L^0))                                      class token -> head

One plain nn.Module: distribution (DeepSpeed, Accelerate) is applied from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit.config import ViTConfig


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.attn_dropout = cfg.attn_dropout
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj_drop(self.proj(y))


class MLP(nn.Module):
    """Two linear layers with a GELU between them (paper eq. 3)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-LN transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x


class PreLogits(nn.Module):
    """The paper's pre-training head hidden layer: Linear -> tanh."""

    def __init__(self, width: int, size: int):
        super().__init__()
        self.fc = nn.Linear(width, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT as in the paper. `forward(images)` takes (B, C, H, W) float images, returns (B, classes) logits."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        # A stride-P conv over P x P patches is exactly "flatten each patch, multiply by E".
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))
        self.pos_drop = nn.Dropout(cfg.dropout)
        # Deeper blocks are dropped more often: rate grows linearly from 0 to drop_path.
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        rep = cfg.representation_size
        self.pre_logits = PreLogits(D, rep) if rep else nn.Identity()
        self.head = nn.Linear(rep or D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Init as in big_vision: trunc-normal embeddings, Xavier linears, zero head."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        fan_in = self.patch_embed.in_channels * self.patch_embed.kernel_size[0] ** 2
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))  # LeCun normal
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward: ~1/3 more compute for far less memory."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimiser must not decay (besides biases and norm weights, found by shape)."""
        return {"cls_token", "pos_embed"}

    def group_matcher(self) -> dict[str, str]:
        """Parameter groups by depth, as regexes on parameter names (the optimizer builder derives layer-wise
        LR decay from them): the embeddings are layer 0, block i is layer i + 1, the rest is the top layer."""
        return {"embed": r"^(cls_token|pos_embed|patch_embed)", "blocks": r"^blocks\.(\d+)\."}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N+1, D) tokens with class token and position embeddings."""
        # Channels-last in, channels-last out: the (B, N, D) tokens below are then a view of the conv's output, not
        # a transposed copy. A transposed copy fused into the embedding dropout's kernel is the pattern whose
        # dropout masks torch.compile draws wrongly on CUDA from torch 2.13 (docs/architecture.md, "Model").
        x = self.patch_embed(images.contiguous(memory_format=torch.channels_last))  # (B, D, H/P, W/P), NHWC memory
        if x.shape[-2:] != self.cfg.grid:
            raise ValueError(
                f"input {tuple(images.shape[-2:])} gives a {tuple(x.shape[-2:])} patch grid but the model "
                f"was built for {self.cfg.image_hw} ({self.cfg.grid}); resize the input or rebuild the "
                "model at this size (vit.weights loads with pos-embed resampling)"
            )
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), contiguous
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N+1, D)
        return self.pos_drop(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, D) final-LN'd tokens."""
        x = self.embed(images)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N+1, D) tokens -> (B, classes) logits."""
        x = x[:, 0] if self.cfg.pool == "token" else x[:, 1:].mean(dim=1)  # (B, D)
        return self.head(self.pre_logits(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

