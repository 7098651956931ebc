"""data_prep.transforms and data_prep.augment: crop boxes, draft decoding, normalisation, Mixup/CutMix."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.augment import mixup_cutmix, smooth_one_hot, soft_target_cross_entropy
from data_prep.stream import DataCfg, build_loader
from data_prep.transforms import (
    center_crop_box,
    crop_resize_pil,
    normalize,
    parse_randaugment,
    pil_to_chw,
    random_resized_crop_box,
)
from runtime.dist import DistEnv
from tests.stream_fixtures import crc, make_jpeg, write_dataset


def test_center_crop_box_is_the_shorter_side_rule() -> None:
    # 500x375 -> shorter side 256 (scale 256/375), centre 224 crop = 224/256 of the shorter side in source px
    left, top, w, h = center_crop_box(500, 375, (224, 224), 0.875)
    assert (w, h) == (328, 328) and (left, top) == ((500 - 328) // 2, (375 - 328) // 2)
    assert center_crop_box(100, 100, (64, 64), 1.0) == (0, 0, 100, 100)
    left, top, w, h = center_crop_box(400, 300, (96, 192), 0.5)  # (h, w): covers 192 x 384, crop the middle
    assert (w, h) == (200, 100) and (left, top) == (100, 100)


def test_random_resized_crop_box_respects_scale_ratio_and_seed() -> None:
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(500, 375, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 0.95 <= w * h / (500 * 375) <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    boxes = [random_resized_crop_box(500, 375, random.Random(5)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    # no crop fits the ratio range in a 1000x10 strip: the widest allowed centre crop
    assert random_resized_crop_box(1000, 10, random.Random(0), (0.9, 1.0), (3 / 4, 4 / 3)) == (493, 0, 13, 10)


def _photo(w: int = 500, h: int = 375) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_draft_decoding_matches_a_full_decode() -> None:
    data = _photo()
    box = (100, 50, 300, 280)
    out = crop_resize_pil(data, box, (32, 40), flip=False)
    assert out.size == (40, 32) and out.mode == "RGB"
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((40, 32), Image.Resampling.BILINEAR,
                                                               box=(100, 50, 400, 330))
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(full, dtype=np.int16))
    assert diff[..., :2].mean() < 3  # the smooth channels agree; the draft really took the small path:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (40 * 500 // 300, 32 * 375 // 280))
        assert img.size == (125, 94)  # 1/4 scale in the decoder
    flipped = crop_resize_pil(data, box, (32, 40), flip=True)
    assert np.array_equal(np.asarray(flipped), np.asarray(out)[:, ::-1])


def test_bicubic_is_pils_bicubic_and_the_eval_loader_resizes_with_it(tmp_path: Path) -> None:
    """data.interpolation=bicubic (timm's ViT eval filter) is PIL's antialiased bicubic, in crop_resize_pil and in
    the eval stream; bilinear stays the default."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)  # filters differ on detail
    Image.fromarray(noise).save(buf, format="PNG")  # no JPEG draft: the whole decode is PIL's filter alone
    box, size = (10, 5, 100, 80), (32, 40)
    got = {f: np.asarray(crop_resize_pil(buf.getvalue(), box, size, False, f), dtype=np.int16)
           for f in ("bilinear", "bicubic")}
    full = Image.fromarray(noise)
    want = np.asarray(full.resize((40, 32), Image.Resampling.BICUBIC, box=(10, 5, 110, 85)), dtype=np.int16)
    assert np.array_equal(got["bicubic"], want) and np.abs(got["bilinear"] - want).mean() > 2
    ds = write_dataset(tmp_path / "ds", {"val": [6]})

    def first_batch(**kw) -> torch.Tensor:
        ld = build_loader(DataCfg(path=str(ds), workers=0, crop_pct=0.875, **kw), "val", train=False,
                          dist_env=DistEnv(), image_size=24, micro_batch=6, device="cpu", seed=0)
        return next(iter(ld))[0]

    jpg = make_jpeg(0)[0]
    w, h = Image.open(io.BytesIO(jpg)).size
    ref = {f: pil_to_chw(crop_resize_pil(jpg, center_crop_box(w, h, (24, 24), 0.875), (24, 24), False, f))
           for f in ("bilinear", "bicubic")}
    default, bicubic = first_batch(), first_batch(interpolation="bicubic")
    assert torch.equal(default[0], ref["bilinear"]) and torch.equal(bicubic[0], ref["bicubic"])
    assert not torch.equal(default, bicubic)


def test_normalize() -> None:
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    y = normalize(x, dtype=torch.float32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (x.float() / 255 - mean) / std)
    assert normalize(x, device="cpu").dtype == torch.bfloat16 and normalize(x[0]).shape == (3, 5, 5)
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float())


def test_parse_randaugment() -> None:
    ra = parse_randaugment("rand-m7-n3")
    assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (3, 7, 11)
    assert parse_randaugment(None) is None
    for bad in ("augmix-m9", "rand-m9-mstd0.5", "rand-m11"):
        with pytest.raises(ValueError, match="randaugment"):
            parse_randaugment(bad)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_randaugment_in_the_loader_is_seeded(tmp_path: Path, decode: str) -> None:
    ds = write_dataset(tmp_path / "ds", {"train": [8, 8]})

    def pixels(randaugment: str | None) -> list[int]:
        state = torch.get_rng_state()
        data = DataCfg(path=str(ds), workers=0, randaugment=randaugment, decode=decode)
        ld = build_loader(data, "train", train=True, dist_env=DistEnv(), image_size=24, micro_batch=4, seed=1,
                          global_batch=8, device="cpu")
        out = [crc(x) for x, _ in ld]
        assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone
        return out

    with_ra = pixels("rand-m9-n2")
    assert with_ra == pixels("rand-m9-n2") and with_ra != pixels(None)


def test_smooth_one_hot_and_filler_rows() -> None:
    t = smooth_one_hot(torch.tensor([2, -1, 0]), 4, smoothing=0.1)
    torch.testing.assert_close(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    assert t[1].abs().sum() == 0 and t[2].sum().item() == pytest.approx(1.0)


def test_mixup_blends_pairs_with_reversed_batch() -> None:
    x = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    before = x.clone()
    mixed, targets = mixup_cutmix(x, labels, 5, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0,
                                  rng=np.random.default_rng(0))
    assert torch.equal(x, before)  # input untouched
    lam = targets[0, 0].item()
    assert 0 < lam < 1 and targets[0, 3].item() == pytest.approx(1 - lam, abs=1e-6)
    torch.testing.assert_close(mixed, x * lam + x.flip(0) * (1 - lam))
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_cutmix_lambda_is_the_pasted_area() -> None:
    x = torch.zeros(2, 1, 16, 16)
    x[1] = 1.0
    mixed, targets = mixup_cutmix(x, torch.tensor([0, 1]), 2, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0,
                                  rng=np.random.default_rng(3))
    pasted = mixed[0].mean().item()  # sample 0 is zeros; the box holds sample 1's ones
    assert 0 < pasted < 1 and targets[0, 1].item() == pytest.approx(pasted)
    assert targets[1, 0].item() == pytest.approx(1 - mixed[1].mean().item())
    same, t = mixup_cutmix(x, torch.tensor([0, 1]), 2, prob=0.0, label_smoothing=0.0)
    assert same is x and torch.equal(t, torch.eye(2))


def test_soft_target_cross_entropy_matches_hard_labels() -> None:
    logits = torch.randn(3, 5)
    labels = torch.tensor([1, 4, 0])
    loss = soft_target_cross_entropy(logits, smooth_one_hot(labels, 5))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))


def test_fixture_images_are_real_jpegs() -> None:
    data, label = make_jpeg(3)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and img.size == (64, 48) and 0 <= label <= 9
