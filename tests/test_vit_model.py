"""Our ViT against timm's reference implementation, plus the model's own behaviour."""

from __future__ import annotations

import pytest
import timm
import torch

from vit import VisionTransformer, vit_config
from vit.weights import from_timm, to_timm


def _randomise(model: torch.nn.Module) -> None:
    # timm zero-inits some tensors; random values make a key mix-up visible in the logits.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


# B/16 whole; L/16 with 4 of its 24 blocks (its width, heads, MLP and patch; every block is the same code, and
# the whole L/16 was ~12 s of compute)
@pytest.mark.parametrize(
    "timm_name,variant,depth", [("vit_base_patch16_224", "B/16", None),
                                pytest.param("vit_large_patch16_224", "L/16", 4, marks=pytest.mark.slow)]
)
def test_logits_match_timm(timm_name: str, variant: str, depth: int | None) -> None:
    # Built on the meta device: both inits (seconds at L/16) would be overwritten by _randomise and the load.
    kw = {"depth": depth} if depth else {}
    with torch.device("meta"):
        ref = timm.create_model(timm_name, pretrained=False, **kw).eval()
        ours = VisionTransformer(vit_config(variant, **kw)).eval()
    ref.to_empty(device="cpu")
    _randomise(ref)
    result = ours.load_state_dict(from_timm(ref.state_dict()), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (2, 1000)
    assert a.abs().mean() > 1e-2  # logits are not trivially zero
    assert (a - b).abs().max().item() <= 1e-4


def test_timm_conversion_round_trips() -> None:
    ref = timm.create_model("vit_base_patch16_224", pretrained=False)
    sd = ref.state_dict()
    back = to_timm(from_timm(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    ours = VisionTransformer(vit_config("B/16"))
    ref.load_state_dict(to_timm(ours.state_dict()), strict=True)  # our keys load into timm too


def test_mean_pooling_matches_timm_without_fc_norm() -> None:
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, global_pool="avg", fc_norm=False,
                            num_classes=7).eval()
    _randomise(ref)
    ours = VisionTransformer(vit_config("S/16", pool="mean", num_classes=7)).eval()
    ours.load_state_dict(from_timm(ref.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4


def test_timm_parts_we_lack_are_refused() -> None:
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, init_values=1e-5)  # layer-scale
    with pytest.raises(ValueError, match="does not have"):
        from_timm(ref.state_dict())


def test_paper_variant_sizes() -> None:
    def params(name: str) -> float:
        with torch.device("meta"):
            return sum(p.numel() for p in VisionTransformer(vit_config(name)).parameters()) / 1e6

    # ViT paper table 1: 86M, 307M, 632M (with a 1000-class head; the paper's counts are rounded)
    assert params("B/16") == pytest.approx(86.6, abs=0.5)
    assert params("L/16") == pytest.approx(304.3, abs=1.0)
    assert params("H/14") == pytest.approx(632.0, abs=2.0)
    assert vit_config("vit_l16").width == 1024 and vit_config("h14").patch_size == 14


def test_unknown_variant_suggests_names() -> None:
    with pytest.raises(ValueError, match="L/16"):
        vit_config("L/61")


def test_bad_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of patch size 16"):
        vit_config("B/16", image_size=230)
    model = VisionTransformer(vit_config("debug"))
    with pytest.raises(ValueError, match="patch grid"):
        model(torch.randn(1, 3, 48, 48))


def test_pretraining_head_is_tanh_mlp() -> None:
    cfg = vit_config("debug", representation_size=24, num_classes=5)
    model = VisionTransformer(cfg).eval()
    assert model.pre_logits.fc.out_features == 24 and model.head.in_features == 24
    tokens = model.forward_features(torch.randn(3, 3, 32, 32))
    hidden = torch.tanh(model.pre_logits.fc(tokens[:, 0]))
    torch.testing.assert_close(model.forward_head(tokens), model.head(hidden))


def test_non_square_input() -> None:
    model = VisionTransformer(vit_config("debug", image_size=(32, 48)))
    assert model.pos_embed.shape == (1, 4 * 6 + 1, 32)
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 10)


def test_tokens_are_the_patch_conv_output_read_in_order() -> None:
    """The patch conv returns channels-last memory, so the (B, N, D) tokens that the embedding dropout reads are
    a view of it in order, not a transposed copy (docs/architecture.md, "Model"); the values are the NCHW conv's."""
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("debug", image_size=(32, 48))).eval()
    torch.nn.init.normal_(model.pos_embed)
    seen: list[torch.Tensor] = []
    model.patch_embed.register_forward_hook(lambda module, args, out: seen.append(out))
    images = torch.randn(2, 3, 32, 48)  # NCHW, as the loaders deliver them
    tokens = model.embed(images)  # (B, N+1, D)
    (conv_out,) = seen
    assert conv_out.flatten(2).transpose(1, 2).is_contiguous()
    ref = torch.nn.functional.conv2d(images, model.patch_embed.weight, model.patch_embed.bias, stride=8)
    torch.testing.assert_close(tokens[:, 1:], ref.flatten(2).transpose(1, 2) + model.pos_embed[:, 1:])


def test_grad_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("debug"))
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(4, 3, 32, 32)

    def grads(ckpt: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b)


def test_drop_path_only_in_training() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("debug", drop_path=0.5))
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    assert model.blocks[0].drop_path == 0.0 and model.blocks[-1].drop_path == 0.5


def test_info_cli_lists_variants(capsys) -> None:
    from vit.__main__ import main

    assert main(["info", "B/16", "H/14"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:4] == ["B/16", "224", "197", "86.6M"]
    assert out[2].split()[0] == "H/14" and len(out) == 3
