"""Tests for biasdd.pipeline.corruptions: contract, determinism, severity ordering, the simple formulas."""

from __future__ import annotations

import colorsys

import imagecorruptions
import numpy as np
import pytest
from imagecorruptions.corruptions import plasma_fractal as package_plasma_fractal
from PIL import Image

from biasdd.pipeline import corruptions
from biasdd.pipeline.corruptions import CORRUPTIONS, PROTOCOLS, corrupt

RANDOM_CORRUPTIONS = ("snow", "frost", "fog", "spatter", "elastic_transform")
SEVERITIES = (1, 2, 3, 4)


def _textured_image(seed: int = 0) -> np.ndarray:
    """(32, 32, 3) uint8: a colour gradient half-blended with uniform noise, so every corruption bites."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:32, 0:32]
    gradient = np.stack([cols * 8, rows * 8, (rows + cols) * 4], axis=-1).astype(np.float64)
    noise = rng.integers(0, 256, size=(32, 32, 3))
    return np.clip(0.5 * gradient + 0.5 * noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _textured_image()


def _all_cases() -> list[tuple[str, int, str]]:
    return [
        (protocol, attribute, name) for protocol in PROTOCOLS for attribute, name in enumerate(CORRUPTIONS)
    ]


def test_registry_matches_protocol_order() -> None:
    # docs/protocol.md §4: attribute k is the aligned corruption of CIFAR-10 class k
    assert CORRUPTIONS == (
        "snow",
        "frost",
        "fog",
        "brightness",
        "contrast",
        "spatter",
        "elastic_transform",
        "jpeg_compression",
        "pixelate",
        "saturate",
    )
    assert PROTOCOLS == ("cifar10c", "imagenet-c")
    assert set(CORRUPTIONS) <= set(imagecorruptions.get_corruption_names("all"))


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize(("protocol", "attribute", "name"), _all_cases())
def test_shape_dtype_and_changes(
    image: np.ndarray, protocol: str, attribute: int, name: str, severity: int
) -> None:
    before = image.copy()
    out = corrupt(image, attribute, severity, protocol, np.random.default_rng(0))
    assert out.shape == (32, 32, 3)
    assert out.dtype == np.uint8
    assert not np.array_equal(out, image), f"{name} left the image unchanged"
    np.testing.assert_array_equal(image, before)  # input not modified in place


@pytest.mark.parametrize(("protocol", "attribute", "name"), _all_cases())
def test_same_seed_same_bytes(image: np.ndarray, protocol: str, attribute: int, name: str) -> None:
    first = corrupt(image, attribute, 4, protocol, np.random.default_rng(123))
    second = corrupt(image, attribute, 4, protocol, np.random.default_rng(123))
    assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", RANDOM_CORRUPTIONS)
def test_different_seed_different_output(image: np.ndarray, protocol: str, name: str) -> None:
    attribute = CORRUPTIONS.index(name)
    outs = {
        corrupt(image, attribute, 3, protocol, np.random.default_rng(seed)).tobytes() for seed in range(4)
    }
    assert len(outs) > 1


@pytest.mark.parametrize(("protocol", "attribute", "name"), _all_cases())
def test_global_rng_untouched(image: np.ndarray, protocol: str, attribute: int, name: str) -> None:
    np.random.seed(2024)
    expected = np.random.random(3)
    np.random.seed(2024)
    corrupt(image, attribute, 2, protocol, np.random.default_rng(5))
    np.testing.assert_array_equal(np.random.random(3), expected)


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_imagenet_c_is_the_package_function(image: np.ndarray, name: str, severity: int) -> None:
    """imagenet-c = imagecorruptions.corrupt at level s + 1 with the global RNG seeded from `rng`."""
    seed = int(np.random.default_rng(9).integers(2**32))  # the one draw corrupt() makes
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        expected = imagecorruptions.corrupt(image, corruption_name=name, severity=severity + 1)
    finally:
        np.random.set_state(state)
    out = corrupt(image, CORRUPTIONS.index(name), severity, "imagenet-c", np.random.default_rng(9))
    np.testing.assert_array_equal(out, expected)


def test_cifar10c_milder_than_imagenet_c_for_jpeg(image: np.ndarray) -> None:
    # docs/protocol.md §4: quality 40 (CIFAR-10-C level 5) vs 7 (ImageNet-C level 5) at study severity 4
    attribute = CORRUPTIONS.index("jpeg_compression")
    errors = [
        np.abs(corrupt(image, attribute, 4, protocol, np.random.default_rng(0)).astype(int) - image).mean()
        for protocol in PROTOCOLS
    ]
    assert errors[0] < errors[1]


# ------------------------------------------------------------------------------------------------
# severity ordering
# ------------------------------------------------------------------------------------------------


def _mean_abs_error(image: np.ndarray, name: str, protocol: str = "cifar10c") -> list[float]:
    attribute = CORRUPTIONS.index(name)
    return [
        float(
            np.abs(
                corrupt(image, attribute, s, protocol, np.random.default_rng(0)).astype(int) - image
            ).mean()
        )
        for s in SEVERITIES
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_contrast_severity_reduces_std(image: np.ndarray, protocol: str) -> None:
    attribute = CORRUPTIONS.index("contrast")
    stds = [corrupt(image, attribute, s, protocol, np.random.default_rng(0)).std() for s in SEVERITIES]
    assert all(a > b for a, b in zip(stds, stds[1:], strict=False)), stds


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_brightness_severity_raises_mean(image: np.ndarray, protocol: str) -> None:
    attribute = CORRUPTIONS.index("brightness")
    means = [corrupt(image, attribute, s, protocol, np.random.default_rng(0)).mean() for s in SEVERITIES]
    assert image.mean() < means[0]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means


@pytest.mark.parametrize("name", ["jpeg_compression", "pixelate", "contrast", "brightness"])
def test_error_grows_with_severity(image: np.ndarray, name: str) -> None:
    errors = _mean_abs_error(image, name)
    assert all(a < b for a, b in zip(errors, errors[1:], strict=False)), errors


# ------------------------------------------------------------------------------------------------
# the simple formulas against direct computations
# ------------------------------------------------------------------------------------------------


def _hsv_map(image: np.ndarray, fn) -> np.ndarray:
    """Apply `fn(h, s, v) -> (h, s, v)` per pixel with colorsys; float RGB in [0, 255]."""
    flat = image.reshape(-1, 3) / 255.0
    out = np.array([colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*pixel))) for pixel in flat])
    return np.clip(out, 0, 1).reshape(image.shape) * 255


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_formula(image: np.ndarray, severity: int) -> None:
    add = (0.1, 0.15, 0.2, 0.3)[severity - 1]  # docs/protocol.md §4
    expected = _hsv_map(image, lambda h, s, v: (h, s, min(max(v + add, 0.0), 1.0)))
    out = corrupt(image, CORRUPTIONS.index("brightness"), severity, "cifar10c", np.random.default_rng(0))
    # floor of nearly equal floats can differ by one level
    assert np.abs(out.astype(int) - np.floor(expected).astype(int)).max() <= 1


@pytest.mark.parametrize("severity", SEVERITIES)
def test_saturate_formula(image: np.ndarray, severity: int) -> None:
    multiply, add = ((0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))[severity - 1]  # docs/protocol.md §4
    expected = _hsv_map(image, lambda h, s, v: (h, min(max(s * multiply + add, 0.0), 1.0), v))
    out = corrupt(image, CORRUPTIONS.index("saturate"), severity, "cifar10c", np.random.default_rng(0))
    assert np.abs(out.astype(int) - np.floor(expected).astype(int)).max() <= 1


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_formula(image: np.ndarray, severity: int) -> None:
    factor = (0.5, 0.4, 0.3, 0.15)[severity - 1]  # docs/protocol.md §4
    x = image / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    expected = np.floor(np.clip((x - means) * factor + means, 0, 1) * 255).astype(np.uint8)
    out = corrupt(image, CORRUPTIONS.index("contrast"), severity, "cifar10c", np.random.default_rng(0))
    np.testing.assert_array_equal(out, expected)


def _box_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of PIL's BOX resampling: the box of width `scale` sampled at input centres."""
    scale = in_size / out_size
    support = 0.5 * max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        for j in range(max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)):
            offset = (j - centre + 0.5) / max(scale, 1.0)
            weights[i, j] = 1.0 if -0.5 <= offset < 0.5 else 0.0
    return weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_pixelate_formula(image: np.ndarray, severity: int) -> None:
    side = int(32 * (0.9, 0.85, 0.75, 0.65)[severity - 1])  # docs/protocol.md §4
    down, up = _box_weights(32, side), _box_weights(side, 32)
    small = np.einsum("ij,kl,jlc->ikc", down, down, image.astype(np.float64))  # (side, side, 3)
    expected = np.einsum("ij,kl,jlc->ikc", up, up, small)  # (32, 32, 3)
    out = corrupt(image, CORRUPTIONS.index("pixelate"), severity, "cifar10c", np.random.default_rng(0))
    # PIL rounds to uint8 after each of its passes
    assert np.abs(out.astype(float) - expected).max() <= 1.5
    # and the image really went through `side` x `side`: the down-sampled image matches PIL's
    pil_small = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BOX)).astype(float)
    assert np.abs(pil_small - small).max() <= 1.0


@pytest.mark.parametrize("severity", SEVERITIES)
def test_jpeg_is_pil_at_the_table_quality(image: np.ndarray, severity: int) -> None:
    import io

    quality = (65, 58, 50, 40)[severity - 1]  # docs/protocol.md §4
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    out = corrupt(
        image, CORRUPTIONS.index("jpeg_compression"), severity, "cifar10c", np.random.default_rng(0)
    )
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("wibble_decay", [3.0, 2.5, 2.0, 1.75])
def test_plasma_fractal_matches_package(wibble_decay: float) -> None:
    """The rng-driven port draws in the package's order: with the same stream it gives the same map."""
    np_state = np.random.get_state()
    try:
        np.random.seed(11)
        expected = package_plasma_fractal(mapsize=32, wibbledecay=wibble_decay)
    finally:
        np.random.set_state(np_state)
    ours = corruptions._plasma_fractal(np.random.RandomState(11), wibble_decay)  # same legacy stream
    assert ours.shape == (32, 32)
    np.testing.assert_allclose(ours, expected, atol=1e-5)  # the package works in float32


def test_frost_is_weighted_sum_with_a_texture_crop(image: np.ndarray) -> None:
    image_weight, frost_weight = 0.75, 0.45  # study severity 4, docs/protocol.md §4
    out = corrupt(image, CORRUPTIONS.index("frost"), 4, "cifar10c", np.random.default_rng(3))
    textures = corruptions._frost_textures()
    assert len(textures) == 5  # make_cifar_c.py uses the first five frost images
    rng = np.random.default_rng(3)
    texture = textures[rng.integers(5)]
    top, left = rng.integers(0, texture.shape[0] - 32), rng.integers(0, texture.shape[1] - 32)
    crop = texture[top : top + 32, left : left + 32].astype(float)
    expected = np.clip(image_weight * image + frost_weight * crop, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attribute", [-1, 10, 1.0, True, "3"])
def test_bad_attribute(image: np.ndarray, attribute: object) -> None:
    with pytest.raises(ValueError, match=rf"attribute={attribute!r}.*0\.\.9.*snow"):
        corrupt(image, attribute, 1, "cifar10c", np.random.default_rng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("severity", [0, 5, 2.0])
def test_bad_severity(image: np.ndarray, severity: object) -> None:
    with pytest.raises(ValueError, match=rf"severity={severity!r}.*\(1, 2, 3, 4\)"):
        corrupt(image, 0, severity, "cifar10c", np.random.default_rng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", ["imagenet_c", "CIFAR10C", ""])
def test_bad_protocol(image: np.ndarray, protocol: str) -> None:
    with pytest.raises(ValueError, match=rf"protocol='{protocol}'.*cifar10c.*imagenet-c"):
        corrupt(image, 0, 1, protocol, np.random.default_rng(0))


@pytest.mark.parametrize(
    "bad_image",
    [np.zeros((32, 32), np.uint8), np.zeros((28, 28, 3), np.uint8), np.zeros((32, 32, 3), np.float32)],
)
def test_bad_image(bad_image: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\(32, 32, 3\) uint8"):
        corrupt(bad_image, 0, 1, "cifar10c", np.random.default_rng(0))


def test_numpy_integers_accepted(image: np.ndarray) -> None:
    out = corrupt(image, np.int64(4), np.int32(2), "cifar10c", np.random.default_rng(0))
    expected = corrupt(image, 4, 2, "cifar10c", np.random.default_rng(0))
    np.testing.assert_array_equal(out, expected)


def test_imagenet_c_output_coerced_to_uint8_rgb(image: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float or wrongly sized package result is truncated to uint8 and brought back to (32, 32, 3)."""
    grey = np.linspace(-10.0, 300.0, 34 * 35).reshape(34, 35)  # float, grey, too large

    monkeypatch.setattr(imagecorruptions, "corrupt", lambda *args, **kwargs: grey)
    out = corrupt(image, 0, 1, "imagenet-c", np.random.default_rng(0))
    assert out.shape == (32, 32, 3)
    assert out.dtype == np.uint8
    expected = np.floor(np.clip(grey[:32, :32], 0, 255)).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)
