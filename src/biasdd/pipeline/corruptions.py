"""The ten CCIFAR10-DD corruptions (docs/protocol.md §4), one 32x32 RGB image at a time.

Attribute k is the corruption `CORRUPTIONS[k]`, the bias-aligned corruption of CIFAR-10 class k.
Study severity s in 1..4 is CIFAR-10-C level s + 1, as in the study (and in LfF's Corrupted CIFAR-10,
which calls the corruption functions at `severity + 1`).

Two protocols:

- `cifar10c` (the default): the Hendrycks & Dietterich CIFAR-10-C functions, i.e. the 32x32 parameter
  tables of `ImageNet-C/create_c/make_cifar_c.py` in hendrycks/robustness. The reference draws from the
  global `np.random` and uses ImageMagick (Wand) for the motion blur of `snow`; here every random number
  comes from the caller's `np.random.Generator`, and the motion blur is the numpy port of ImageMagick's
  kernel that ships with the `imagecorruptions` package. The frost textures are the package's images.
- `imagenet-c`: the `imagecorruptions` package's own functions as they are (ImageNet-sized tables,
  much harsher at 32 px), at level s + 1, with the global numpy RNG seeded from the caller's generator
  and restored afterwards.

Either way the result is uint8 by truncation (clip to [0, 255], then floor), as `np.uint8(...)` does in
the reference scripts. The global RNG save/restore of `imagenet-c` is not thread-safe: parallelise over
processes, not threads.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import numbers
from collections.abc import Callable

import cv2
import imagecorruptions
import numpy as np
import scipy.ndimage
import skimage.color
from imagecorruptions.corruptions import _motion_blur as _package_motion_blur
from PIL import Image

__all__ = ["CORRUPTIONS", "PROTOCOLS", "corrupt"]

# Index = attribute = the CIFAR-10 class whose aligned corruption it is (docs/protocol.md §4).
CORRUPTIONS: tuple[str, ...] = (
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
PROTOCOLS: tuple[str, ...] = ("cifar10c", "imagenet-c")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4)

_SIZE = 32  # CIFAR-10 side; the cifar10c tables are sized for it
_IMAGE_SHAPE = (_SIZE, _SIZE, 3)

# ---------------------------------------------------------------------------------------------------
# CIFAR-10-C parameter tables per study severity 1..4 = make_cifar_c.py levels 2..5 (docs/protocol.md §4).
# ---------------------------------------------------------------------------------------------------

# snow: (loc, scale, zoom, threshold, motion-blur radius, motion-blur sigma, image mix)
_SNOW = (
    (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
# snow: motion-blur angle ~ U(-135, -45) degrees (make_cifar_c.py)
_SNOW_ANGLE = (-135.0, -45.0)
# frost: (image weight, frost weight)
_FROST = ((1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
# frost: make_cifar_c.py draws `np.random.randint(5)`, so only the first five textures are used,
# each shrunk by 0.2 (cv2 default bilinear) before a random 32x32 crop.
_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
_FROST_SCALE = 0.2
# fog: (amount, wibble decay) of a plasma fractal with map size 32
_FOG = ((0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))
_PLASMA_MAPSIZE = 32
_PLASMA_WIBBLE = 100.0  # initial wibble of the diamond-square fractal (make_cifar_c.py)
# brightness: added to the HSV value channel
_BRIGHTNESS = (0.1, 0.15, 0.2, 0.3)
# contrast: factor around the per-channel mean
_CONTRAST = (0.5, 0.4, 0.3, 0.15)
# spatter: (loc, scale, blur sigma, threshold, intensity, mud?)
_SPATTER = (
    (0.65, 0.1, 0.8, 0.7, 0.5, 0),
    (0.65, 0.3, 1.0, 0.69, 0.5, 0),
    (0.65, 0.1, 0.7, 0.69, 0.6, 1),
    (0.65, 0.1, 0.5, 0.68, 0.6, 1),
)
# spatter colours (make_cifar_c.py): water is pale turquoise, added in the image's channel order;
# mud is brown (RGB).
_WATER_COLOUR = np.array([175.0, 238.0, 238.0]) / 255.0
_MUD_COLOUR = np.array([63.0, 42.0, 20.0]) / 255.0
# spatter: emboss kernel applied to the equalised distance map (make_cifar_c.py)
_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
# spatter (mud): the blurred mask is cut below this level (make_cifar_c.py)
_MUD_CUT = 0.8
# elastic_transform: (alpha, sigma, affine jitter) = IMSIZE * (.05, .2, .07), (.08, .06, .06),
# (.1, .04, .05), (.1, .03, .03) with IMSIZE = 32
_ELASTIC = ((1.6, 6.4, 2.24), (2.56, 1.92, 1.92), (3.2, 1.28, 1.6), (3.2, 0.96, 0.96))
_ELASTIC_TRUNCATE = 3.0  # gaussian truncation of the displacement fields (make_cifar_c.py)
# jpeg_compression: PIL quality
_JPEG_QUALITY = (65, 58, 50, 40)
# pixelate: side scale of the BOX down-sampling, then BOX up to 32 again
_PIXELATE = (0.9, 0.85, 0.75, 0.65)
# saturate: (multiply, add) on HSV saturation
_SATURATE = ((0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))

CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and truncate, like `np.uint8(...)` in the reference scripts."""
    return np.clip(x, 0, 255).astype(np.uint8)


@functools.cache
def _frost_textures() -> tuple[np.ndarray, ...]:
    """The five frost textures of make_cifar_c.py, shrunk x0.2 and in RGB; loaded once per process."""
    textures = []
    root = importlib.resources.files(imagecorruptions) / "frost"
    for name in _FROST_FILES:
        with importlib.resources.as_file(root / name) as path:
            bgr = cv2.imread(str(path))
        if bgr is None:
            raise FileNotFoundError(f"frost texture {name} not found in the imagecorruptions package")
        small = cv2.resize(bgr, (0, 0), fx=_FROST_SCALE, fy=_FROST_SCALE)
        textures.append(np.ascontiguousarray(small[..., ::-1]))  # BGR -> RGB
    return tuple(textures)


def _plasma_fractal(rng: np.random.Generator, wibble_decay: float) -> np.ndarray:
    """Diamond-square height map in [0, 1], (32, 32); make_cifar_c.py's `plasma_fractal`, with `rng`.

    The draws are made in the reference's order (per level: squares, then the two diamond sets).
    """
    size = _PLASMA_MAPSIZE
    heights = np.empty((size, size), dtype=np.float64)
    heights[0, 0] = 0.0
    step = size
    wibble = _PLASMA_WIBBLE

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        # squares: the centre of each square of corners `step` apart
        corners = heights[0:size:step, 0:size:step]
        square_sum = corners + np.roll(corners, shift=-1, axis=0)
        square_sum += np.roll(square_sum, shift=-1, axis=1)
        heights[half:size:step, half:size:step] = wibbled_mean(square_sum)
        # diamonds: the edge midpoints, from the two adjacent corners and the two adjacent centres
        centres = heights[half:size:step, half:size:step]
        corners = heights[0:size:step, 0:size:step]
        left_right = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        heights[0:size:step, half:size:step] = wibbled_mean(left_right)
        top_bottom = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        heights[half:size:step, 0:size:step] = wibbled_mean(top_bottom)
        step //= 2
        wibble /= wibble_decay

    heights -= heights.min()
    return heights / heights.max()


def _clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    """Zoom the centre crop of an (H, H, C) image back to (H, H, C); make_cifar_c.py's version."""
    side = img.shape[0]
    crop = int(np.ceil(side / zoom_factor))
    top = (side - crop) // 2
    zoomed = scipy.ndimage.zoom(
        img[top : top + crop, top : top + crop], (zoom_factor, zoom_factor, 1), order=1
    )
    trim = (zoomed.shape[0] - side) // 2  # trim the extra pixels of the rounding, centred
    return zoomed[trim : trim + side, trim : trim + side]


# ---------------------------------------------------------------------------------------------------
# cifar10c corruptions: uint8 (32, 32, 3) in, float in [0, 255] (or uint8) out
# ---------------------------------------------------------------------------------------------------


def _snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, mix = _SNOW[severity - 1]
    x = image.astype(np.float32) / 255.0
    layer = rng.normal(loc=loc, scale=scale, size=image.shape[:2])
    layer = _clipped_zoom(layer[..., np.newaxis], zoom)
    layer[layer < threshold] = 0
    # The reference hands ImageMagick an 8-bit grey PNG and reads an 8-bit PNG back.
    layer_u8 = (np.clip(layer.squeeze(-1), 0, 1) * 255).astype(np.uint8)
    angle = rng.uniform(*_SNOW_ANGLE)
    blurred = _package_motion_blur(layer_u8.astype(np.float32), radius=radius, sigma=sigma, angle=angle)
    layer = (np.clip(np.round(blurred), 0, 255) / 255.0)[..., np.newaxis]  # (32, 32, 1)

    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., np.newaxis]
    x = mix * x + (1 - mix) * np.maximum(x, grey * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


def _frost(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    image_weight, frost_weight = _FROST[severity - 1]
    textures = _frost_textures()
    texture = textures[rng.integers(len(textures))]
    top = rng.integers(0, texture.shape[0] - _SIZE)
    left = rng.integers(0, texture.shape[1] - _SIZE)
    crop = texture[top : top + _SIZE, left : left + _SIZE]
    return np.clip(image_weight * image + frost_weight * crop.astype(np.float64), 0, 255)


def _fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount, wibble_decay = _FOG[severity - 1]
    x = image / 255.0
    max_val = x.max()
    x += amount * _plasma_fractal(rng, wibble_decay)[:_SIZE, :_SIZE, np.newaxis]
    return np.clip(x * max_val / (max_val + amount), 0, 1) * 255


def _brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = skimage.color.rgb2hsv(image / 255.0)
    x[..., 2] = np.clip(x[..., 2] + _BRIGHTNESS[severity - 1], 0, 1)
    return np.clip(skimage.color.hsv2rgb(x), 0, 1) * 255


def _contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = image / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)  # (1, 1, 3)
    return np.clip((x - means) * _CONTRAST[severity - 1] + means, 0, 1) * 255


def _spatter(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, sigma, threshold, intensity, mud = _SPATTER[severity - 1]
    x = image.astype(np.float32) / 255.0
    liquid = rng.normal(loc=loc, scale=scale, size=image.shape[:2])
    # skimage.filters.gaussian (the reference) is this scipy call with its defaults
    liquid = scipy.ndimage.gaussian_filter(liquid, sigma=sigma, mode="nearest", truncate=4.0)
    liquid[liquid < threshold] = 0

    if not mud:
        # The reference's `(liquid * 255).astype(np.uint8)` wraps values above 1 modulo 256 on x86;
        # spell that out so that the result does not depend on the platform's float -> uint8 cast.
        liquid_u8 = ((liquid * 255).astype(np.int64) & 0xFF).astype(np.uint8)
        dist = 255 - cv2.Canny(liquid_u8, 50, 150)
        dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
        dist = cv2.equalizeHist(dist)
        dist = cv2.filter2D(dist, cv2.CV_8U, _EMBOSS)
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        wet = liquid_u8 * dist  # (32, 32) float32
        peak = wet.max()
        # The reference divides by the peak unguarded (NaN image when no drop survives); no drop = no change.
        wet = wet / peak * intensity if peak > 0 else np.zeros_like(wet)
        return np.clip(x + wet[..., np.newaxis] * _WATER_COLOUR, 0, 1) * 255

    mask = np.where(liquid > threshold, 1, 0).astype(np.float32)
    mask = scipy.ndimage.gaussian_filter(mask, sigma=intensity, mode="nearest", truncate=4.0)
    mask[mask < _MUD_CUT] = 0
    mask = mask[..., np.newaxis]  # (32, 32, 1)
    return np.clip(x * (1 - mask) + _MUD_COLOUR * mask, 0, 1) * 255


@functools.cache
def _elastic_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Constant pieces of the elastic transform: affine anchor points and the (32, 32, 3) index grid."""
    centre = np.float32((_SIZE, _SIZE)) // 2
    square = _SIZE // 3
    anchors = np.float32([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    cols, rows, chans = np.meshgrid(np.arange(_SIZE), np.arange(_SIZE), np.arange(3))  # each (32, 32, 3)
    return anchors, cols, rows, chans.reshape(-1, 1)


def _elastic_transform(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    alpha, sigma, affine = _ELASTIC[severity - 1]
    anchors, cols, rows, chans = _elastic_grid()
    x = image.astype(np.float32) / 255.0
    # random affine: jitter three anchor points
    moved = anchors + rng.uniform(-affine, affine, size=anchors.shape).astype(np.float32)
    matrix = cv2.getAffineTransform(anchors, moved)
    x = cv2.warpAffine(x, matrix, (_SIZE, _SIZE), borderMode=cv2.BORDER_REFLECT_101)
    # smooth random displacement fields; skimage.filters.gaussian(mode="reflect") in the reference
    dx = scipy.ndimage.gaussian_filter(
        rng.uniform(-1, 1, size=(_SIZE, _SIZE)), sigma, mode="reflect", truncate=_ELASTIC_TRUNCATE
    )
    dy = scipy.ndimage.gaussian_filter(
        rng.uniform(-1, 1, size=(_SIZE, _SIZE)), sigma, mode="reflect", truncate=_ELASTIC_TRUNCATE
    )
    dx = (dx * alpha).astype(np.float32)[..., np.newaxis]
    dy = (dy * alpha).astype(np.float32)[..., np.newaxis]
    indices = ((rows + dy).reshape(-1, 1), (cols + dx).reshape(-1, 1), chans)
    warped = scipy.ndimage.map_coordinates(x, indices, order=1, mode="reflect").reshape(x.shape)
    return np.clip(warped, 0, 1) * 255


def _jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=_JPEG_QUALITY[severity - 1])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side = int(_SIZE * _PIXELATE[severity - 1])
    small = Image.fromarray(image).resize((side, side), Image.Resampling.BOX)
    return np.asarray(small.resize((_SIZE, _SIZE), Image.Resampling.BOX))


def _saturate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    multiply, add = _SATURATE[severity - 1]
    x = skimage.color.rgb2hsv(image / 255.0)
    x[..., 1] = np.clip(x[..., 1] * multiply + add, 0, 1)
    return np.clip(skimage.color.hsv2rgb(x), 0, 1) * 255


_CIFAR10C: dict[str, CorruptionFn] = {
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "spatter": _spatter,
    "elastic_transform": _elastic_transform,
    "jpeg_compression": _jpeg_compression,
    "pixelate": _pixelate,
    "saturate": _saturate,
}
assert tuple(_CIFAR10C) == CORRUPTIONS


# ---------------------------------------------------------------------------------------------------
# imagenet-c: the package's functions as they are
# ---------------------------------------------------------------------------------------------------


def _imagenet_c(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`imagecorruptions.corrupt` at level severity + 1, its global-RNG draws seeded from `rng`."""
    seed = int(rng.integers(2**32))  # np.random.seed takes 0 .. 2**32 - 1
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = imagecorruptions.corrupt(image, corruption_name=name, severity=severity + 1)
    finally:
        np.random.set_state(state)
    out = np.asarray(out)
    if out.ndim == 2:  # a grey result: replicate to RGB
        out = np.repeat(out[..., np.newaxis], 3, axis=-1)
    if out.shape != _IMAGE_SHAPE:
        # keep the top-left 32x32 (how the package itself crops snow), padding with the edge if smaller
        out = out[:_SIZE, :_SIZE, :3]
        pad = [(0, _SIZE - out.shape[0]), (0, _SIZE - out.shape[1]), (0, 3 - out.shape[2])]
        out = np.pad(out, pad, mode="edge")
    return out if out.dtype == np.uint8 else _to_uint8(out)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate(image: np.ndarray, attribute: int, severity: int, protocol: str) -> None:
    if not _is_int(attribute) or not 0 <= attribute < len(CORRUPTIONS):
        choices = ", ".join(f"{index}={name}" for index, name in enumerate(CORRUPTIONS))
        raise ValueError(f"attribute={attribute!r} is not valid; expected an integer in 0..9 ({choices})")
    if not _is_int(severity) or severity not in SEVERITIES:
        raise ValueError(f"severity={severity!r} is not valid; expected one of {SEVERITIES}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not valid; expected one of {PROTOCOLS}")
    if not isinstance(image, np.ndarray) or image.shape != _IMAGE_SHAPE or image.dtype != np.uint8:
        got = (image.shape, image.dtype) if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a (32, 32, 3) uint8 array (HWC), got {got}")


def corrupt(
    image: np.ndarray, attribute: int, severity: int, protocol: str, rng: np.random.Generator
) -> np.ndarray:
    """Apply the corruption `CORRUPTIONS[attribute]` at study severity `severity` under `protocol`.

    image: (32, 32, 3) uint8 HWC. Returns a new (32, 32, 3) uint8 array, truncated (floor after clip to
    [0, 255]) as the study does. Study severity 1..4 is CIFAR-10-C / ImageNet-C level 2..5.
    All randomness comes from `rng`; the global numpy RNG is left as it was. The same image, arguments
    and generator state give identical bytes.
    """
    _validate(image, attribute, severity, protocol)
    name = CORRUPTIONS[attribute]
    image = np.ascontiguousarray(image)
    if protocol == "imagenet-c":
        return _imagenet_c(image, name, int(severity), rng)
    out = _CIFAR10C[name](image, int(severity), rng)
    assert out.shape == _IMAGE_SHAPE, (name, out.shape)
    return out if out.dtype == np.uint8 else _to_uint8(out)
