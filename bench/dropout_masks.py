"""The compiled model's dropout masks, recovered exactly: at the configured rate, independent of their
neighbours, and the same in the backward as in the forward (docs/architecture.md, "Model").

    python bench/dropout_masks.py                                        # a GPU: B/16 at 224 px, compiled
    python bench/dropout_masks.py --variant debug --image-size 32 --device cpu --no-compile   (CPU check)

The model is set up so that every token entering the embedding dropout is 1 (patch conv 0 with bias 1, class
token 1, position embeddings 0) and the blocks add nothing (their output projections are 0); with the final
LayerNorm an identity, `forward_features` returns the embedding dropout's output, mask / (1 - p). The position
embeddings' gradient of its sum is the mask the backward applied, summed over the batch. The graph is still the
real one: the patch conv, the token layout, the blocks and their dropouts, compiled as the trainers compile it.
A check, not a benchmark: it prints `check dropout masks: ok` or what failed, and exits 1 on a failure.
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


class _Features(nn.Module):
    """forward = the model's forward_features: what torch.compile sees is the backbone's real graph."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


def build(variant: str, image_size: int, p: float, depth: int) -> VisionTransformer:
    """A `variant` ViT with dropout `p` whose embedding-dropout output is its features (see the docstring)."""
    cfg = vit_config(variant, image_size=image_size, dropout=p, num_classes=10)
    model = VisionTransformer(cfg)
    del model.blocks[depth:]
    with torch.no_grad():
        model.patch_embed.weight.zero_()
        model.patch_embed.bias.fill_(1.0)
        model.cls_token.fill_(1.0)
        model.pos_embed.zero_()
        for block in model.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    model.norm = nn.Identity()
    return model.train()


def recover(model: VisionTransformer, images: torch.Tensor, p: float,
            compile: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward mask (B, N+1, D) bool, the backward's keep count per position (N+1, D)) of one step."""
    run = torch.compile(_Features(model)) if compile else _Features(model)
    model.pos_embed.grad = None
    out = run(images)  # (B, N+1, D): mask / (1 - p)
    out.float().sum().backward()
    mask = out.detach().float() > 0
    counts = model.pos_embed.grad[0].float() * (1 - p)  # (N+1, D): sum over the batch of the backward's mask
    return mask, counts


def findings(mask: torch.Tensor, counts: torch.Tensor, p: float) -> list[str]:
    """What is wrong with a recovered (B, T, D) forward mask and the backward's counts; empty if nothing."""
    out = []
    keep = mask.float().mean().item()
    sd = math.sqrt(p * (1 - p) / mask.numel())
    if abs(keep - (1 - p)) > SIGMAS * sd:
        out.append(f"keep rate {keep:.5f}, expected {1 - p:.5f} +- {SIGMAS * sd:.5f}")
    same = p * p + (1 - p) * (1 - p)  # two independent masks agree this often
    for dim, name in ((0, "batch"), (1, "token"), (2, "channel")):
        a, b = mask.narrow(dim, 0, mask.shape[dim] - 1), mask.narrow(dim, 1, mask.shape[dim] - 1)
        rate = (a == b).float().mean().item()
        sd = math.sqrt(same * (1 - same) / a.numel())
        if abs(rate - same) > SIGMAS * sd:
            out.append(f"neighbours along the {name} axis agree {rate:.4f} of the time, independent masks "
                       f"{same:.4f} +- {SIGMAS * sd:.4f}")
    differ = (counts.round() != mask.sum(0).float()).float().mean().item()
    if differ > 0:
        out.append(f"the backward applied another mask than the forward at {differ:.1%} of the positions")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64, help="<= 128: the backward's counts stay exact in bf16")
    ap.add_argument("--p", type=float, default=0.5, help="dropout rate (0.5: duplicated masks stand out most)")
    ap.add_argument("--depth", type=int, default=2, help="blocks kept (each with its own dropouts)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="eager (the CPU check of this script)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    model = build(args.variant, args.image_size, args.p, args.depth).to(args.device, dtype)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
    mask, counts = recover(model, images, args.p, not args.no_compile)
    found = findings(mask, counts, args.p)
    where = f"torch {torch.__version__}, {args.device}, {'compiled' if not args.no_compile else 'eager'}"
    print(f"{args.variant} @ {args.image_size}, batch {args.batch}, p {args.p}: {mask.numel():,} mask elements "
          f"({where})")
    print("check dropout masks: " + ("ok" if not found else "FAILED: " + "; ".join(found)))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
