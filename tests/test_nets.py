"""The networks: ConvNet's first convolution computes its own weight gradient on the CPU; MaskReLU is ReLU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from biasdd.training.nets import ConvNet, MaskReLU, PatchGradConv2d, _PatchGrad, build_network, with_mask_relu


def _pair(padding: int = 3, dtype: torch.dtype = torch.float64) -> tuple[nn.Conv2d, PatchGradConv2d]:
    torch.manual_seed(0)
    native = nn.Conv2d(3, 5, 3, padding=padding).to(dtype)
    patched = PatchGradConv2d(3, 5, 3, padding=padding).to(dtype)
    patched.load_state_dict(native.state_dict())
    return native, patched


@pytest.mark.parametrize("padding", [1, 3])
def test_patch_grad_matches_the_native_convolution(padding: int) -> None:
    native, patched = _pair(padding)
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    target = torch.randn(4, 5, 8 + 2 * padding, 8 + 2 * padding, dtype=torch.float64)
    grads = []
    for conv in (native, patched):
        out = conv(x)
        grads.append((out, *torch.autograd.grad(((out - target) ** 2).sum(), [conv.weight, conv.bias])))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_patch_grad_passes_gradcheck_and_double_backward() -> None:
    _, patched = _pair()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _PatchGrad.apply(x, w, b, 3)

    assert torch.autograd.gradcheck(fn, (x, patched.weight, patched.bias))
    assert torch.autograd.gradgradcheck(fn, (x, patched.weight, patched.bias))


def test_patch_grad_under_vmap_and_func_grad() -> None:
    native, patched = _pair()
    params = {k: v.detach() for k, v in patched.named_parameters()}
    x = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64)  # 3 groups of 2 images

    def loss(module: nn.Module):
        return lambda p, images: functional_call(module, p, (images,)).square().sum()

    per_group = vmap(grad(loss(patched)), in_dims=(None, 0))(params, x)
    expected = vmap(grad(loss(native)), in_dims=(None, 0))(params, x)
    for name in params:
        torch.testing.assert_close(per_group[name], expected[name])


def test_inputs_that_need_their_gradient_take_the_native_convolution() -> None:
    _, patched = _pair()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert "_PatchGrad" in type(patched(x).grad_fn).__name__
    assert "Convolution" in type(patched(x.requires_grad_(True)).grad_fn).__name__


def test_patch_grad_under_bf16_autocast_is_close_to_the_native_one() -> None:
    native, patched = _pair(dtype=torch.float32)
    x = torch.randn(8, 3, 28, 28)
    grads = []
    for conv in (native, patched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(out.float().square().sum(), [conv.weight, conv.bias]))
    for a, b in zip(*grads, strict=True):
        assert a.dtype == torch.float32 and b.dtype == torch.float32
        assert ((a - b).norm() / a.norm()).item() < 1e-2


def test_convnet_first_block_uses_it_and_state_dicts_stay_conv2d() -> None:
    net = build_network("convnet3", 3, 10, 28, 8, generator=torch.Generator().manual_seed(0))
    assert isinstance(net, ConvNet)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert isinstance(convs[0], PatchGradConv2d)
    assert not any(isinstance(c, PatchGradConv2d) for c in convs[1:])
    plain = copy.deepcopy(net)
    plain.features[0].__class__ = nn.Conv2d
    plain.load_state_dict(net.state_dict())
    x = torch.randn(4, 3, 28, 28)
    y = torch.arange(4)
    g_net = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    g_plain = torch.autograd.grad(F.cross_entropy(plain(x), y), list(plain.parameters()))
    for a, b in zip(g_net, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mask_relu_equals_relu_with_its_first_and_second_derivatives() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64).repeat(3, 1).requires_grad_(True)
    v = torch.randn(3, 5, dtype=torch.float64)
    outs = []
    for relu in (nn.ReLU(), MaskReLU()):
        y = relu(x)
        (g,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * y).sum(), x)  # a second derivative through the first
        outs.append((y.detach(), g.detach(), h))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)  # -0.0 == 0.0: the values, not the signs of zero


def test_with_mask_relu_is_a_copy_with_the_same_parameters_and_outputs() -> None:
    net = build_network("convnet3", 3, 10, 32, 8, generator=torch.Generator().manual_seed(0)).double()
    masked = with_mask_relu(net)
    assert not any(isinstance(m, nn.ReLU) for m in masked.modules())
    assert sum(isinstance(m, MaskReLU) for m in masked.modules()) == 3
    assert any(isinstance(m, nn.ReLU) for m in net.modules())  # the original is untouched
    assert [n for n, _ in masked.named_parameters()] == [n for n, _ in net.named_parameters()]
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(masked(x), net(x))
