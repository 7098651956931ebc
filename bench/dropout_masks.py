"""The compiled model's dropout masks, recovered exactly: at the configured rate, independent of their
neighbours, and the same in the backward as in the forward, with and without gradient checkpointing
(docs/architecture.md, "Model").

    python bench/dropout_masks.py                                        # a GPU: B/16 at 224 px, compiled
    python bench/dropout_masks.py --variant debug --image-size 32 --device cpu --no-compile   (CPU check)

The model is set up so that its features are a sum of dropout outputs that can be taken apart: every token
entering the embedding dropout is 1 (patch conv 0 with bias 1, class token 1, position embeddings 0), block i's
attention adds 0 and its MLP adds dropout(c_i) (fc2's weight 0, its bias c_i = 3 * 4^i, so each term exceeds
the sum of the smaller ones), and the final LayerNorm is an identity. The gradient of the features' sum is the
mask each dropout's backward applied: summed over the batch for the position embeddings, over batch and
tokens for fc2's bias. The graph is still the real one (patch conv, token layout, blocks, every dropout),
compiled as the trainers compile it. A check, not a benchmark: it prints `check dropout masks ...: ok` or what
failed, and exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vit import VisionTransformer, vit_config  # noqa: E402

SIGMAS = 6.0  # a rate this far from its prediction is a finding, not chance


def _term(i: int) -> float:
    """Block i's MLP output before its dropout: larger than the embedding's 1 plus every smaller block's term."""
    return 3.0 * 4**i


class _Features(nn.Module):
    """forward = the model's forward_features: what torch.compile sees is the backbone's real graph."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


def build(variant: str, image_size: int, p: float, depth: int) -> VisionTransformer:
    """A `variant` ViT with dropout `p` and `depth` blocks whose features are its separable dropout outputs."""
    model = VisionTransformer(vit_config(variant, image_size=image_size, dropout=p, num_classes=10))
    del model.blocks[depth:]
    with torch.no_grad():
        model.patch_embed.weight.zero_()
        model.patch_embed.bias.fill_(1.0)
        model.cls_token.fill_(1.0)
        model.pos_embed.zero_()
        for i, block in enumerate(model.blocks):
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
            block.mlp.fc2.bias.fill_(_term(i))
    model.norm = nn.Identity()
    return model.train()


def recover(model: VisionTransformer, images: torch.Tensor, p: float,
            compile: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per dropout observed ("embedding", "block i MLP"): (its forward mask (B, N+1, D) bool, the forward mask
    summed as the backward's is, the backward's keep counts) for one step."""
    run = torch.compile(_Features(model)) if compile else _Features(model)
    model.zero_grad(set_to_none=True)
    out = run(images)  # (B, N+1, D)
    out.float().sum().backward()
    rest = out.detach().float() * (1 - p)  # sum of kept terms: 1 (embedding) and c_i (block i)
    found = {}
    for i in reversed(range(len(model.blocks))):
        c = _term(i)
        mask = rest > c - 0.5
        rest = rest - c * mask
        bwd = model.blocks[i].mlp.fc2.bias.grad.float() * (1 - p)  # (D,)
        found[f"block {i} MLP"] = (mask, mask.sum((0, 1)).float(), bwd)
    mask = rest > 0.5
    found["embedding"] = (mask, mask.sum(0).float(), model.pos_embed.grad[0].float() * (1 - p))  # (N+1, D)
    return dict(reversed(found.items()))


def findings(name: str, mask: torch.Tensor, fwd: torch.Tensor, bwd: torch.Tensor, p: float) -> list[str]:
    """What is wrong with one dropout's recovered (B, T, D) mask and its backward's counts; empty if nothing.
    The counts may be rounded to bf16 (8 significant bits): a difference within that is not a finding."""
    out = []
    keep = mask.float().mean().item()
    sd = math.sqrt(p * (1 - p) / mask.numel())
    if abs(keep - (1 - p)) > SIGMAS * sd:
        out.append(f"{name}: keep rate {keep:.5f}, expected {1 - p:.5f} +- {SIGMAS * sd:.5f}")
    same = p * p + (1 - p) * (1 - p)  # two independent masks agree this often
    for dim, axis in ((0, "batch"), (1, "token"), (2, "channel")):
        a, b = mask.narrow(dim, 0, mask.shape[dim] - 1), mask.narrow(dim, 1, mask.shape[dim] - 1)
        rate = (a == b).float().mean().item()
        sd = math.sqrt(same * (1 - same) / a.numel())
        if abs(rate - same) > SIGMAS * sd:
            out.append(f"{name}: neighbours along the {axis} axis agree {rate:.4f} of the time, independent "
                       f"masks {same:.4f} +- {SIGMAS * sd:.4f}")
    differ = ((bwd - fwd).abs() > 0.5 + fwd / 128).float().mean().item()
    if differ > 0:
        out.append(f"{name}: the backward applied another mask than the forward at {differ:.1%} of the positions")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4, help="small: the backward's counts stay near-exact in bf16")
    ap.add_argument("--p", type=float, default=0.5, help="dropout rate (0.5: duplicated masks stand out most)")
    ap.add_argument("--depth", type=int, default=2, help="blocks kept (the MLP output dropout of each is checked)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="eager (the CPU check of this script)")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32  # the pre-training backend's parameters
    how = f"torch {torch.__version__}, {args.device}, {'eager' if args.no_compile else 'compiled'}"
    failed = False
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build(args.variant, args.image_size, args.p, args.depth).to(args.device, dtype)
        model.set_grad_checkpointing(ckpt)
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
        found = [f for name, masks in recover(model, images, args.p, not args.no_compile).items()
                 for f in findings(name, *masks, args.p)]
        failed |= bool(found)
        what = "with gradient checkpointing" if ckpt else "without checkpointing"
        print(f"check dropout masks {what} ({args.variant} @ {args.image_size}, batch {args.batch}, p {args.p}, "
              f"{args.depth + 1} dropouts; {how}): " + ("ok" if not found else "FAILED: " + "; ".join(found)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
