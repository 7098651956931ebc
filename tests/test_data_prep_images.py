"""One image -> shard bytes: odd kinds become RGB, bad ones are rejected with the right reason,
resizing never upscales and decodes JPEGs at a reduced DCT scale, `keep` passes JPEG bytes through."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from data_prep.examples import photo_crops, write_odd_images
from data_prep.images import ImageOptions, Reject, encode_image


def _jpeg(size=(500, 375), **save) -> bytes:
    _, img = next(photo_crops(1, size=size, seed=3))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _decoded(enc) -> Image.Image:
    img = Image.open(io.BytesIO(enc.data))
    img.load()
    return img


def test_odd_kinds_become_rgb_and_bad_ones_are_rejected(tmp_path):
    expect = write_odd_images(tmp_path)
    kept = {}
    for rel, reason in expect.items():
        path = tmp_path / rel
        if reason in ("unreadable", "duplicate"):  # decided by the writer, not by one image's bytes
            continue
        data = path.read_bytes()
        if reason is None:
            kept[rel] = encode_image(data, ImageOptions())
        else:
            with pytest.raises(Reject) as e:
                encode_image(data, ImageOptions())
            assert e.value.reason == reason, rel
    for rel, enc in kept.items():
        img = _decoded(enc)
        assert img.mode == "RGB", rel
        assert img.size == (enc.width, enc.height), rel
    assert (kept["odd/rotated.jpg"].width, kept["odd/rotated.jpg"].height) == (40, 48)  # EXIF 6: turned upright
    assert kept["odd/nested/image.bmp"].ext == "jpg"  # keep: formats other than JPEG/PNG/WebP become JPEG
    assert kept["odd/nested/deeper/image.webp"].ext == "webp"
    # 16-bit grey is scaled to 8 bits (not clipped to white): it matches the 8-bit grey version
    g16 = np.asarray(_decoded(kept["odd/gray16.png"]), np.int16)
    g8 = np.asarray(_decoded(kept["odd/gray.png"]), np.int16)
    assert np.abs(g16 - g8).max() <= 1 and g8.std() > 10
    # transparency is composited over white: the top row (alpha ~0 in the vertical gradient) is white
    rgba = np.asarray(_decoded(kept["odd/rgba.png"]))
    assert (rgba[0] >= 250).all() and (rgba[-1] < 250).any()
    cmyk = np.asarray(_decoded(kept["odd/cmyk.jpg"]), np.int16)
    ref = np.asarray(Image.open(tmp_path / "odd/gray.png").convert("RGB"), np.int16)
    assert np.abs(cmyk.mean(axis=2) - ref.mean(axis=2)).mean() < 25  # same picture, not an inverted one


def test_keep_passes_jpeg_bytes_through_and_other_formats_reencode():
    data = _jpeg()
    enc = encode_image(data, ImageOptions(resize_shorter=1000))  # would upscale: no resize, so untouched
    assert enc.data is data and (enc.width, enc.height) == (500, 375)
    enc = encode_image(data, ImageOptions(format="jpeg", quality=50))
    assert enc.data != data and len(enc.data) < len(data) and enc.ext == "jpg"
    enc = encode_image(data, ImageOptions(format="webp"))
    assert _decoded(enc).format == "WEBP" and enc.ext == "webp"


@pytest.mark.parametrize(("opts", "size"), [
    (dict(resize_shorter=100), (133, 100)),
    (dict(resize_longer=200), (200, 150)),
    (dict(resize_shorter=300, resize_longer=200), (200, 150)),  # the tighter limit wins
    (dict(resize_shorter=375), (500, 375)),  # exactly the size: nothing to do
])
def test_resize_sizes(opts, size):
    enc = encode_image(_jpeg(), ImageOptions(**opts))
    assert (enc.width, enc.height) == size == _decoded(enc).size


def test_shrinking_a_jpeg_decodes_at_a_reduced_scale(monkeypatch):
    """draft is asked for the target size, so libjpeg decodes 1000x750 at 1/4 scale for a 160 px target."""
    asked = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        asked.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    enc = encode_image(_jpeg(size=(1000, 750)), ImageOptions(resize_shorter=160))
    assert (enc.width, enc.height) == (213, 160)
    (requested, decoded), = asked
    assert requested == (213, 160) and decoded == (250, 188)  # 1/4 scale, still >= the target


def test_exif_rotation_with_resize():
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees on display
    enc = encode_image(_jpeg(size=(600, 400), exif=exif), ImageOptions(resize_shorter=100))
    assert (enc.width, enc.height) == (100, 150) == _decoded(enc).size


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_is_caught_even_when_passed_through(progressive):
    data = _jpeg(progressive=progressive)
    assert encode_image(data, ImageOptions()).data is data
    for cut in (len(data) // 3, len(data) - 64):
        with pytest.raises(Reject) as e:
            encode_image(data[:cut], ImageOptions())
        assert e.value.reason == "truncated"


def test_bad_options_are_refused():
    for kw in (dict(format="gif"), dict(quality=0), dict(resize_shorter=0), dict(min_size=0)):
        with pytest.raises(ValueError, match="--"):
            ImageOptions(**kw)


def test_example_data_is_scikit_learns():
    """The example loaders read scikit-learn's bundled files directly (fast); same data as its loaders."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.datasets import load_sample_images

    from data_prep.examples import load_digits, sample_photos

    images, targets = load_digits()
    ref = sk_digits()
    assert np.array_equal(images, ref.images) and np.array_equal(targets, ref.target)
    photos = sample_photos()
    for name, img in zip(("china", "flower"), load_sample_images().images, strict=True):
        assert np.array_equal(photos[name], img)
