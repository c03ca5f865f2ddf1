"""DSA ops against direct computations, siamese sharing, gradients, determinism; DC augmentation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biasdd.training.augment import DSA_OPS, DCAugConfig, DSAConfig, _dc_scale, dc_augment, dsa_augment

SIZE = 16


def make_cfg(strategy: str, **overrides: float) -> DSAConfig:
    values = dict(
        ratio_crop_pad=0.125,
        ratio_cutout=0.5,
        ratio_scale=1.2,
        ratio_rotate=15.0,
        brightness=1.0,
        saturation=2.0,
        contrast=0.5,
    )
    values.update(overrides)
    return DSAConfig(strategy=strategy, **values)


def images(n: int = 6, seed: int = 0, channels: int = 3) -> torch.Tensor:
    # Strictly positive, so a zeroed pixel can only come from cutout / zero fill.
    return torch.rand(n, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) + 0.5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def replay(seed: int) -> torch.Generator:
    """A generator positioned after dsa_augment's op draw (single-op strategies draw it too)."""
    generator = gen(seed)
    torch.randint(1, (1,), generator=generator)
    return generator


def test_flip_matches_torch_flip():
    x = images(32)
    out = dsa_augment(x, make_cfg("flip"), gen(1))
    flipped = torch.rand(32, generator=replay(1)) < 0.5
    assert 0 < int(flipped.sum()) < 32
    expected = torch.where(flipped.view(-1, 1, 1, 1), torch.flip(x, dims=[3]), x)
    assert torch.equal(out, expected)


def test_color_formula():
    cfg = make_cfg("color")
    x = images(5)
    out = dsa_augment(x, cfg, gen(2))
    generator = replay(2)
    rand_b, rand_s, rand_c = (torch.rand(5, generator=generator).view(-1, 1, 1, 1) for _ in range(3))
    y = x + (rand_b - 0.5) * cfg.brightness  # brightness
    y = (y - y.mean(1, keepdim=True)) * (rand_s * cfg.saturation) + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * (rand_c + cfg.contrast) + y.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, y)


def test_brightness_alone_adds_offset():
    # saturation u * 2 and contrast u + 0.5 are not identities, so check brightness via the replayed draw:
    # with saturation and contrast driven to identity by a single-channel constant image.
    cfg = make_cfg("color")
    x = torch.full((4, 1, SIZE, SIZE), 0.25)
    out = dsa_augment(x, cfg, gen(3))
    rand_b = torch.rand(4, generator=replay(3))
    # One channel: pixel mean = pixel, so saturation is identity; constant image: contrast is identity.
    expected = x + (rand_b.view(-1, 1, 1, 1) - 0.5) * cfg.brightness
    torch.testing.assert_close(out, expected)


def shift_zero_fill(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = x[i + dy, j + dx], zero outside."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    src_rows = slice(max(dy, 0), h + min(dy, 0))
    dst_rows = slice(max(-dy, 0), h + min(-dy, 0))
    src_cols = slice(max(dx, 0), w + min(dx, 0))
    dst_cols = slice(max(-dx, 0), w + min(-dx, 0))
    out[..., dst_rows, dst_cols] = x[..., src_rows, src_cols]
    return out


def test_crop_is_integer_shift_with_zero_fill():
    x = images(16)
    out = dsa_augment(x, make_cfg("crop"), gen(4))
    generator = replay(4)
    shift = round(0.125 * SIZE)  # 2
    rows = torch.randint(-shift, shift + 1, (16,), generator=generator)
    cols = torch.randint(-shift, shift + 1, (16,), generator=generator)
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 1
    for i in range(16):
        assert torch.equal(out[i], shift_zero_fill(x[i], int(rows[i]), int(cols[i])))


def test_cutout_zeroes_a_square_of_the_right_side():
    x = images(64)
    out = dsa_augment(x, make_cfg("cutout"), gen(5))
    side = round(0.5 * SIZE)
    full = 0
    for i in range(64):
        zero = out[i] == 0  # (C, H, W); x is positive, so zeros are the cut-out
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        rows = zero[0].any(1).nonzero().flatten()
        cols = zero[0].any(0).nonzero().flatten()
        assert rows.numel() > 0
        # a rectangle: every pixel in the bounding box is zero, the rest untouched
        box = torch.zeros_like(zero[0])
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert torch.equal(zero[0], box)
        assert torch.equal(out[i][:, ~box], x[i][:, ~box])
        height, width = rows.numel(), cols.numel()
        assert height <= side and width <= side
        inside = rows.min() > 0 and rows.max() < SIZE - 1 and cols.min() > 0 and cols.max() < SIZE - 1
        if inside:
            assert (height, width) == (side, side)
            full += 1
    assert full > 0


@pytest.mark.parametrize("op", ["scale", "rotate"])
def test_scale_rotate_identity_params_give_input(op):
    cfg = make_cfg(op, ratio_scale=1.0, ratio_rotate=0.0)
    x = images(4)
    torch.testing.assert_close(dsa_augment(x, cfg, gen(6)), x, rtol=0, atol=1e-5)


def test_scale_and_rotate_match_affine_grid():
    x = images(4)
    out = dsa_augment(x, make_cfg("scale"), gen(7))
    generator = replay(7)
    low, high = 1 / 1.2, 1.2
    sx = torch.rand(4, generator=generator) * (high - low) + low
    sy = torch.rand(4, generator=generator) * (high - low) + low
    theta = torch.zeros(4, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    torch.testing.assert_close(out, F.grid_sample(x, grid, align_corners=False))

    out = dsa_augment(x, make_cfg("rotate"), gen(8))
    angle = (torch.rand(4, generator=replay(8)) - 0.5) * 2 * 15.0 / 180 * math.pi
    assert angle.abs().max() <= 15 / 180 * math.pi
    theta = torch.stack(
        [
            torch.stack([angle.cos(), -angle.sin(), torch.zeros(4)], 1),
            torch.stack([angle.sin(), angle.cos(), torch.zeros(4)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    torch.testing.assert_close(out, F.grid_sample(x, grid, align_corners=False))


@pytest.mark.parametrize("op", DSA_OPS)
def test_siamese_same_group_same_params(op):
    cfg = make_cfg(op)
    x = images(6)
    groups = torch.tensor([0, 0, 1, 1, 2, 3])
    for seed in range(4):
        out = dsa_augment(torch.cat([x, x]), cfg, gen(seed), groups=torch.cat([groups, groups]))
        assert torch.equal(out[:6], out[6:])
        # identical inputs in one group -> identical outputs
        same = dsa_augment(
            x[:1].expand(5, -1, -1, -1), cfg, gen(seed), groups=torch.zeros(5, dtype=torch.long)
        )
        assert all(torch.equal(same[0], same[i]) for i in range(1, 5))


@pytest.mark.parametrize("op", DSA_OPS)
def test_non_siamese_samples_get_own_params(op):
    cfg = make_cfg(op)
    x = images(1).expand(16, -1, -1, -1)
    out = dsa_augment(x, cfg, gen(9))
    distinct = {tuple(out[i].flatten()[::7].tolist()) for i in range(16)}
    assert len(distinct) > 1


@pytest.mark.parametrize("op", DSA_OPS)
def test_gradients_reach_input(op):
    x = images(4).requires_grad_(True)
    out = dsa_augment(x, make_cfg(op), gen(10), groups=torch.tensor([0, 0, 1, 1]))
    (out * torch.rand(out.shape, generator=gen(11))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_same_seed_same_output_different_seed_differs():
    cfg = make_cfg("color_crop_cutout_flip_scale_rotate")
    x = images(8)
    a = [dsa_augment(x, cfg, gen(12)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    first = torch.stack([dsa_augment(x, cfg, generator := gen(12)), dsa_augment(x, cfg, generator)])
    second = torch.stack([dsa_augment(x, cfg, generator := gen(13)), dsa_augment(x, cfg, generator)])
    assert not torch.equal(first, second)


def test_float64_follows_input_dtype():
    x = images(3).double()
    for op in DSA_OPS:
        assert dsa_augment(x, make_cfg(op), gen(0)).dtype == torch.float64


def test_bad_strategy_names_the_op():
    with pytest.raises(ValueError, match="'blur'"):
        make_cfg("color_blur_crop")
    with pytest.raises(ValueError, match="names no op"):
        make_cfg("")


# --- DC augmentation --------------------------------------------------------------------------------


def reference_scale(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The reference `scalefun` for one image and given resized sides."""
    channels, size_h, size_w = image.shape
    tmp = F.interpolate(image[None], [h, w])[0]
    mhw = max(h, w, size_h, size_w)
    canvas = torch.zeros(channels, mhw, mhw)
    r, c = int((mhw - h) / 2), int((mhw - w) / 2)
    canvas[:, r : r + h, c : c + w] = tmp
    r, c = int((mhw - size_h) / 2), int((mhw - size_w) / 2)
    return canvas[:, r : r + size_h, c : c + size_w]


def test_dc_scale_matches_reference_scalefun():
    x = images(12, channels=1)
    factors = torch.linspace(0.8, 1.2, 12)
    factors_w = factors.flip(0)
    out = _dc_scale(x, factors, factors_w)
    for i in range(12):
        h, w = int(factors[i] * SIZE), int(factors_w[i] * SIZE)
        assert torch.equal(out[i], reference_scale(x[i], h, w)), (h, w)


def test_dc_augment_shape_determinism_identity():
    x = images(10)
    mean = x.mean(dim=(0, 2, 3))
    cfg = DCAugConfig(crop_pad=4, scale=0.2, rotate=45)
    a = dc_augment(x, gen(0), mean, cfg)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, dc_augment(x, gen(0), mean, cfg))
    assert not torch.equal(a, dc_augment(x, gen(1), mean, cfg))
    identity = dc_augment(x, gen(0), mean, DCAugConfig(crop_pad=0, scale=0.0, rotate=0))
    torch.testing.assert_close(identity, x, rtol=0, atol=1e-5)


def test_dc_crop_is_shift_with_mean_fill():
    x = images(24)
    mean = x.mean(dim=(0, 2, 3))
    out = dc_augment(x, gen(3), mean, DCAugConfig(crop_pad=4, scale=0.0, rotate=0))
    shifted = 0
    for i in range(24):
        if torch.allclose(out[i], x[i], atol=1e-5):
            continue  # scale / rotate with identity parameters (or a zero shift)
        found = False
        for dy in range(-4, 4):
            for dx in range(-4, 4):
                fill = mean.view(-1, 1, 1)
                expected = shift_zero_fill(x[i] - fill, dy, dx) + fill
                if torch.allclose(out[i], expected, atol=1e-6):
                    found = True
        assert found, i
        shifted += 1
    assert shifted > 0


def test_dc_aug_config_validation():
    with pytest.raises(ValueError, match="crop_pad"):
        DCAugConfig(crop_pad=-1, scale=0.2, rotate=45)
    with pytest.raises(ValueError, match="scale"):
        DCAugConfig(crop_pad=4, scale=1.5, rotate=45)
