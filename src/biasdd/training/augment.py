"""Differentiable Siamese Augmentation (DSA) and DC's evaluation augmentation, as whole-batch tensor ops.

DSA (docs/protocol.md §6) follows Zhao & Bilen's `DiffAugment` in single-op mode ("S"): each call picks
ONE op of the strategy and applies it with per-sample parameters. Siamese mode shares one set of
parameters within a group (the caller concatenates a class's real and synthetic images and passes the
class as group id), so one call augments every class at once with per-class parameters.

Random numbers: every draw comes from the caller's `torch.Generator`, made on the generator's device and
then moved to the data's device (`non_blocking`). A CPU generator with CUDA data therefore works (and
gives the same draws as on CPU); a generator on the data's device avoids the host-to-device copies.
The op choice has to be known on the host to run one op: it is read from the generator as a Python int,
which costs no device sync when the generator is on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from biasdd.config import (
    Config,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    Range,
    check_value,
    from_dict,
    section,
)
from biasdd.errors import ConfigError

DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DC_AUG_OPS = ("crop", "scale", "rotate")  # the reference's digits strategy 'crop_scale_rotate'
PROB_FLIP = 0.5  # reference ParamDiffAug.prob_flip; not a tunable of the study


@dataclass(frozen=True)
class DSAConfig(Config):
    """DSA parameters (reference `ParamDiffAug`); the `augment.dsa` params section."""

    SECTION: ClassVar[str] = "augment.dsa"

    strategy: str  # ops joined by "_", e.g. "color_crop_cutout_flip_scale_rotate"
    ratio_crop_pad: NonNegativeFloat  # max translation as a fraction of the side (0.125)
    ratio_cutout: NonNegativeFloat  # cutout side as a fraction of the side (0.5)
    ratio_scale: Annotated[float, Range(ge=1)]  # scale factors in U(1/r, r) (1.2)
    ratio_rotate: NonNegativeFloat  # rotation in U(-r, r) degrees (15)
    brightness: float  # x + (u - 0.5) * brightness (1.0)
    saturation: float  # (x - pixel mean) * u * saturation + pixel mean (2.0)
    contrast: float  # (x - image mean) * (u + contrast) + image mean (0.5)

    def check(self, where: str) -> None:
        if not self.ops:
            raise ConfigError(f"{where}.strategy: {self.strategy!r} names no op; choose from {list(DSA_OPS)}")
        for op in self.ops:
            if op not in DSA_OPS:
                raise ConfigError(
                    f"{where}.strategy: unknown op {op!r} in {self.strategy!r}; valid ops are {list(DSA_OPS)}"
                )

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(op for op in self.strategy.split("_") if op)


@dataclass(frozen=True)
class DCAugConfig(Config):
    """DC's evaluation augmentation for digits (reference `get_daparam`: crop 4, scale 0.2, rotate 45);
    the `augment.dc` params section."""

    SECTION: ClassVar[str] = "augment.dc"

    crop_pad: NonNegativeInt  # pad by this many pixels (with the channel mean), then crop back at random
    scale: Fraction  # resize each side by U(1 - scale, 1 + scale), then centre crop/pad
    rotate: NonNegativeInt  # integer angle in [-rotate, rotate] degrees


def dsa_config(params: Mapping[str, Any], dataset: str) -> DSAConfig:
    """The `augment.dsa` params for `dataset`: the strategy without `flip` for the datasets listed in
    `augment.no_flip` (digits; docs/protocol.md §6)."""
    values = dict(section(params, "augment", "dsa"))
    no_flip = check_value("augment.no_flip", section(params, "augment", "no_flip"), tuple[str, ...])
    if dataset in no_flip and isinstance(values.get("strategy"), str):
        values["strategy"] = "_".join(op for op in values["strategy"].split("_") if op != "flip")
    return from_dict(DSAConfig, values, "augment.dsa")


def dc_aug_config(params: Mapping[str, Any]) -> DCAugConfig:
    """The `augment.dc` params."""
    return from_dict(DCAugConfig, section(params, "augment", "dc"), "augment.dc")


# --- random draws -----------------------------------------------------------------------------------


def _uniform(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """(n,) U(0, 1) drawn on the generator's device, returned on `like`'s device and dtype."""
    draw = torch.rand(n, generator=generator, device=generator.device)
    return draw.to(device=like.device, dtype=like.dtype, non_blocking=True)


def _randint(low: int, high: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(n,) integers in [low, high) drawn on the generator's device, returned on `device`."""
    draw = torch.randint(low, high, (n,), generator=generator, device=generator.device)
    return draw.to(device=device, non_blocking=True)


def _per_group(values: Tensor, groups: Tensor | None) -> Tensor:
    """Per-sample parameters: sample i gets values[groups[i]] (siamese) or values[i]."""
    return values if groups is None else values[groups]


# --- DSA ops: x (N, C, H, W), per-sample parameters (N,) -----------------------------------------


def _color(x: Tensor, cfg: DSAConfig, rand_b: Tensor, rand_s: Tensor, rand_c: Tensor) -> Tensor:
    """Reference rand_brightness, rand_saturation, rand_contrast, applied in this order."""
    x = x + (rand_b.view(-1, 1, 1, 1) - 0.5) * cfg.brightness
    pixel_mean = x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
    x = (x - pixel_mean) * (rand_s.view(-1, 1, 1, 1) * cfg.saturation) + pixel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return (x - image_mean) * (rand_c.view(-1, 1, 1, 1) + cfg.contrast) + image_mean


def _translate(x: Tensor, shift_rows: Tensor, shift_cols: Tensor, fill: Tensor | None = None) -> Tensor:
    """out[n, :, i, j] = x[n, :, i + shift_rows[n], j + shift_cols[n]], `fill` (default 0) outside.

    As the reference rand_crop: pad by one pixel of fill, clamp the shifted indices onto that border and
    gather, so gradients flow back to the kept pixels.
    """
    n, _, h, w = x.shape
    if fill is None:
        x_pad = F.pad(x, (1, 1, 1, 1))
    else:
        x_pad = F.pad(x - fill.view(1, -1, 1, 1), (1, 1, 1, 1))
    rows = torch.arange(h, device=x.device).view(1, h) + shift_rows.view(n, 1) + 1  # (N, H)
    cols = torch.arange(w, device=x.device).view(1, w) + shift_cols.view(n, 1) + 1  # (N, W)
    rows = rows.clamp(0, h + 1)
    cols = cols.clamp(0, w + 1)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = x_pad[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)]  # (N, H, W, C)
    out = out.permute(0, 3, 1, 2)
    return out if fill is None else out + fill.view(1, -1, 1, 1)


def _cutout_mask(x: Tensor, size_h: int, size_w: int, centre_rows: Tensor, centre_cols: Tensor) -> Tensor:
    """(N, 1, H, W) mask, 0 on the square of side size centred at (centre_rows, centre_cols), clipped.

    The reference clamps the square's indices into the image; since the square always overlaps the image
    (see `_dsa_params`), that equals intersecting the square with the image.
    """
    _, _, h, w = x.shape
    top = (centre_rows - size_h // 2).view(-1, 1)  # (N, 1)
    left = (centre_cols - size_w // 2).view(-1, 1)
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= top) & (rows < top + size_h)  # (N, H)
    in_cols = (cols >= left) & (cols < left + size_w)  # (N, W)
    cut = in_rows.unsqueeze(2) & in_cols.unsqueeze(1)  # (N, H, W)
    return (~cut).to(x.dtype).unsqueeze(1)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample x through per-sample 2x3 affine matrices (N, 2, 3), zero padding, bilinear.

    align_corners=False is what the reference gets from torch's default (it passes none).
    """
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _scale_theta(scale_rows: Tensor, scale_cols: Tensor) -> Tensor:
    """(N, 2, 3) reference rand_scale matrices [[sx, 0, 0], [0, sy, 0]] (sx acts on width)."""
    zeros = torch.zeros_like(scale_rows)
    row0 = torch.stack([scale_rows, zeros, zeros], dim=1)
    row1 = torch.stack([zeros, scale_cols, zeros], dim=1)
    return torch.stack([row0, row1], dim=1)


def _rotate_theta(angle_rad: Tensor) -> Tensor:
    """(N, 2, 3) reference rand_rotate matrices [[cos, -sin, 0], [sin, cos, 0]]."""
    cos, sin, zeros = torch.cos(angle_rad), torch.sin(angle_rad), torch.zeros_like(angle_rad)
    row0 = torch.stack([cos, -sin, zeros], dim=1)
    row1 = torch.stack([sin, cos, zeros], dim=1)
    return torch.stack([row0, row1], dim=1)


def _shift(size: int, ratio: float) -> int:
    """int(size * ratio + 0.5): the reference's rounding of the crop shift and cutout side."""
    return int(size * ratio + 0.5)


def dsa_augment(
    x: Tensor,
    cfg: DSAConfig,
    generator: torch.Generator,
    groups: Tensor | None = None,
    constant: int = 0,
) -> Tensor:
    """Apply one randomly chosen DSA op to x (N, C, H, W); differentiable wrt x.

    `groups` (N,) int64 with ids in [0, N): samples sharing an id share one set of op parameters
    (siamese mode, e.g. id = class over a class's real and synthetic images). `None`: every sample
    draws its own parameters (used when training on the synthetic set). Parameters are drawn for N
    slots in both modes, so the generator advances the same way whatever the grouping.
    `constant`: the first `constant` samples are a constant target (e.g. real images): they are
    augmented without an autograd graph, which saves the backward pass through them. Every op acts
    on each sample alone, so the values are the same either way.
    """
    op, params = _dsa_params(x, cfg, generator, groups)
    if constant <= 0 or not x.requires_grad:
        return _dsa_apply(op, x, params, cfg)
    with torch.no_grad():
        head = _dsa_apply(op, x[:constant], {k: v[:constant] for k, v in params.items()}, cfg)
    tail = _dsa_apply(op, x[constant:], {k: v[constant:] for k, v in params.items()}, cfg)
    return torch.cat([head, tail])


def _dsa_params(
    x: Tensor, cfg: DSAConfig, generator: torch.Generator, groups: Tensor | None
) -> tuple[str, dict[str, Tensor]]:
    """The op and its per-sample parameters (N,), in the reference's order of draws."""
    ops = cfg.ops
    # Host-side choice of the op (a CPU generator costs no device sync).
    op = ops[int(torch.randint(len(ops), (1,), generator=generator, device=generator.device))]
    n, _, h, w = x.shape
    if op == "color":
        names = ("brightness", "saturation", "contrast")
        return op, {name: _per_group(_uniform(n, generator, x), groups) for name in names}
    if op == "crop":
        shift_h, shift_w = _shift(h, cfg.ratio_crop_pad), _shift(w, cfg.ratio_crop_pad)
        rows = _per_group(_randint(-shift_h, shift_h + 1, n, generator, x.device), groups)
        cols = _per_group(_randint(-shift_w, shift_w + 1, n, generator, x.device), groups)
        return op, {"rows": rows, "cols": cols}
    if op == "cutout":
        size_h, size_w = _shift(h, cfg.ratio_cutout), _shift(w, cfg.ratio_cutout)
        # Reference centre range [0, side + 1 - size % 2): the square always overlaps the image.
        rows = _per_group(_randint(0, h + 1 - size_h % 2, n, generator, x.device), groups)
        cols = _per_group(_randint(0, w + 1 - size_w % 2, n, generator, x.device), groups)
        return op, {"rows": rows, "cols": cols}
    if op == "flip":
        return op, {"flip": _per_group(_uniform(n, generator, x), groups) < PROB_FLIP}
    if op == "scale":
        low, high = 1.0 / cfg.ratio_scale, cfg.ratio_scale
        scale_x = _per_group(_uniform(n, generator, x), groups) * (high - low) + low
        scale_y = _per_group(_uniform(n, generator, x), groups) * (high - low) + low
        return op, {"theta": _scale_theta(scale_x, scale_y)}
    # rotate
    angle = (_per_group(_uniform(n, generator, x), groups) - 0.5) * 2 * cfg.ratio_rotate / 180 * math.pi
    return op, {"theta": _rotate_theta(angle)}


def _dsa_apply(op: str, x: Tensor, params: dict[str, Tensor], cfg: DSAConfig) -> Tensor:
    """Apply `op` with per-sample `params` (each (N, ...)) to x (N, C, H, W)."""
    _, _, h, w = x.shape
    if op == "color":
        return _color(x, cfg, params["brightness"], params["saturation"], params["contrast"])
    if op == "crop":
        return _translate(x, params["rows"], params["cols"])
    if op == "cutout":
        size_h, size_w = _shift(h, cfg.ratio_cutout), _shift(w, cfg.ratio_cutout)
        return x * _cutout_mask(x, size_h, size_w, params["rows"], params["cols"])
    if op == "flip":
        return torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(3), x)
    return _affine(x, params["theta"])  # scale, rotate


# --- DC evaluation augmentation ---------------------------------------------------------------------


def _dc_scale(x: Tensor, factor_h: Tensor, factor_w: Tensor) -> Tensor:
    """Reference scalefun, batched and exact: nearest resize of each image to (int(f_h * H), int(f_w * H)),
    centred on a zero canvas of side max(h, w, H, W), centre crop back to H x W.

    Each output pixel reads one input pixel (or 0), so the whole batch is one gather.
    """
    n, _, size_h, size_w = x.shape
    new_h = (factor_h * size_h).to(torch.int64)  # (N,); the reference uses H for both sides
    new_w = (factor_w * size_h).to(torch.int64)
    canvas = torch.maximum(torch.maximum(new_h, new_w), torch.full_like(new_h, max(size_h, size_w)))
    # Offset of the output window within the resized image: crop start minus paste start.
    offset_h = (canvas - size_h) // 2 - (canvas - new_h) // 2
    offset_w = (canvas - size_w) // 2 - (canvas - new_w) // 2
    pos_h = torch.arange(size_h, device=x.device).view(1, -1) + offset_h.view(-1, 1)  # (N, H) in resized
    pos_w = torch.arange(size_w, device=x.device).view(1, -1) + offset_w.view(-1, 1)  # (N, W)
    valid_h = (pos_h >= 0) & (pos_h < new_h.view(-1, 1))
    valid_w = (pos_w >= 0) & (pos_w < new_w.view(-1, 1))
    # torch 'nearest': src = min(floor(dst * in / out), in - 1), scale computed in float32.
    ratio_h = size_h / new_h.to(torch.float32).clamp(min=1)
    ratio_w = size_w / new_w.to(torch.float32).clamp(min=1)
    src_h = torch.floor(pos_h.clamp(min=0).to(torch.float32) * ratio_h.view(-1, 1)).to(torch.int64)
    src_w = torch.floor(pos_w.clamp(min=0).to(torch.float32) * ratio_w.view(-1, 1)).to(torch.int64)
    src_h = src_h.clamp(max=size_h - 1)
    src_w = src_w.clamp(max=size_w - 1)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = x[batch, :, src_h.view(n, size_h, 1), src_w.view(n, 1, size_w)].permute(0, 3, 1, 2)
    mask = (valid_h.unsqueeze(2) & valid_w.unsqueeze(1)).unsqueeze(1)  # (N, 1, H, W)
    return out * mask.to(x.dtype)


def dc_augment(x: Tensor, generator: torch.Generator, channel_mean: Tensor, cfg: DCAugConfig) -> Tensor:
    """DC's evaluation augmentation for digits (docs/protocol.md §7; reference `augment`, strategy
    'crop_scale_rotate'): each image gets one of crop, scale, rotate, chosen uniformly.

    - crop: pad `crop_pad` with the channel mean, crop back at offsets in [0, 2 * crop_pad) (exact).
    - scale: nearest resize by U(1 - scale, 1 + scale) per side, centre crop/pad with zeros (exact).
    - rotate: integer angle in [-rotate, rotate] degrees about the centre, filled with the mean of the
      channel means. **Approximation**: the reference uses scipy's cubic-spline `rotate` per image on the
      CPU; here one bilinear affine grid over the whole batch.

    All three are computed for the whole batch and one is selected per image (no data-dependent shapes,
    no host sync); the batch is small in evaluation, so the 3x work is cheap.
    `channel_mean` (C,) is the per-channel mean (the reference takes it over the batch).
    """
    n, channels, _, _ = x.shape
    channel_mean = channel_mean.to(device=x.device, dtype=x.dtype).view(channels)
    choice = _randint(0, len(DC_AUG_OPS), n, generator, x.device).view(n, 1, 1, 1)

    pad = cfg.crop_pad
    if pad > 0:
        shift_rows = _randint(0, 2 * pad, n, generator, x.device) - pad
        shift_cols = _randint(0, 2 * pad, n, generator, x.device) - pad
        cropped = _translate(x, shift_rows, shift_cols, fill=channel_mean)
    else:
        cropped = x

    factor_h = _uniform(n, generator, x) * (2 * cfg.scale) + (1 - cfg.scale)
    factor_w = _uniform(n, generator, x) * (2 * cfg.scale) + (1 - cfg.scale)
    scaled = _dc_scale(x, factor_h, factor_w)

    degrees = _randint(-cfg.rotate, cfg.rotate + 1, n, generator, x.device).to(x.dtype)
    fill = channel_mean.mean()
    rotated = _affine(x - fill, _rotate_theta(degrees / 180 * math.pi)) + fill

    return torch.where(choice == 0, cropped, torch.where(choice == 1, scaled, rotated))
