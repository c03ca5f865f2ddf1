"""Networks used to distil and to evaluate, behind a name -> factory registry.

ConvNet-3 is the field's default (docs/protocol.md §5; Zhao & Bilen's `ConvNet`, depth 3, width 128,
instance norm, ReLU, average pooling).

On the CPU the first convolution computes its weight gradient itself (`PatchGradConv2d`): oneDNN's
weight gradient for 3 input channels was the slowest op of a training step (docs/protocol.md §10).
`with_mask_relu` gives a copy whose ReLUs keep their mask in the compute dtype, for graphs that
differentiate through a training step (MTT's student).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _PatchGrad(torch.autograd.Function):
    """A stride-1 conv2d whose weight gradient is one batched matmul over unfolded input patches.

    Forward and the input gradient are the native convolution's; only the weight and bias gradients
    are computed here: (N, out, H*W) @ (N, H*W, in*k*k) summed over N, and a sum of the output gradient.
    The same maths as the native backward (float round-off apart); every op is differentiable and
    vmappable, so double backward, `vmap` and `torch.func.grad` work (tests/test_nets.py).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        x, weight, _, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.padding = padding

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        # Under autocast the forward ran in bf16 while the saved inputs are fp32: compute in grad_out's
        # dtype, hand back each input's own dtype.
        x_low, weight_low = x.to(grad_out.dtype), weight.to(grad_out.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x_low, weight_low, None, [1, 1], [ctx.padding] * 2, [1, 1], False, [0, 0], 1,
                [True, False, False],
            )[0].to(x.dtype)  # fmt: skip
        if ctx.needs_input_grad[1]:
            n, out_channels, height, width = grad_out.shape
            patches = F.unfold(x_low, weight.shape[-1], padding=ctx.padding)  # (N, in*k*k, H*W)
            per_image = torch.bmm(grad_out.reshape(n, out_channels, height * width), patches.transpose(1, 2))
            grad_weight = per_image.sum(0).view_as(weight).to(weight.dtype)  # (out, in, k, k)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3)).to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None


class PatchGradConv2d(nn.Conv2d):
    """`nn.Conv2d` (stride 1, square padding, no groups) that on the CPU computes its weight gradient as a
    batched matmul over unfolded patches (`_PatchGrad`).

    Why: with 3 input channels oneDNN's weight gradient runs at a fraction of its speed on wider layers
    (a 2-core CPU, ConvNet-3 width 32, 100 images in bf16: 6.1 of a 19 ms training step); the matmul
    form made the compiled step ~18% faster (benchmarks/RESULTS.md). Accelerators, and inputs that need
    their own gradient (the synthetic images of DC and DM; DC's matching differentiates through that
    gradient again), keep the native convolution. Parameters and state dict are `nn.Conv2d`'s.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        # False: always the native convolution. MTT sets it: inside `torch.func.grad` under
        # torch.compile its synthetic images read `requires_grad` False, yet need their gradient.
        self.patch_grad = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.patch_grad or x.device.type != "cpu" or x.requires_grad:
            return super().forward(x)
        return _PatchGrad.apply(x, self.weight, self.bias, self.padding[0])


class MaskReLU(nn.Module):
    """ReLU written as x * (x > 0): the same values (a negative input gives -0.0 for 0.0, equal in every
    sum and product), the same first and second derivatives, and a mask in the input's dtype.

    Why: differentiating through a compiled training step (MTT's unrolled student) makes inductor store
    ReLU's mask as a bool tensor, and its CPU code stores and loads bool tensors one byte at a time (a
    scalar loop: ~80% of the step's largest fused kernels under `perf`). Multiplied by a mask in the
    compute dtype, every kernel stays vectorized: the compiled MTT student step (10 steps on 100 images,
    width 32, bf16) went from 1.05 to 0.56 s forward and backward on a 2-core CPU (benchmarks/RESULTS.md).
    """

    def forward(self, x: Tensor) -> Tensor:
        return x * (x > 0).to(x.dtype)


def with_mask_relu(net: nn.Module) -> nn.Module:
    """A copy of `net` with every `nn.ReLU` a `MaskReLU`: the same parameters, names and state dict."""
    net = copy.deepcopy(net)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, MaskReLU())
    return net


class ConvNet(nn.Module):
    """`depth` blocks of [conv 3x3 -> instance norm -> ReLU -> avg-pool 2x2], then a linear classifier.

    Instance norm is GroupNorm with one group per channel and an affine transform, as in the reference.
    28x28 inputs get padding 3 on the first conv so that they flow as 32x32 (docs/protocol.md §5;
    **decision**: also for 3-channel CMNIST-DD).
    """

    def __init__(
        self, channels: int, num_classes: int, im_size: int, width: int = 128, depth: int = 3
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = im_size
        in_channels = channels
        for block in range(depth):
            padding = 3 if (block == 0 and im_size == 28) else 1
            conv = PatchGradConv2d if block == 0 else nn.Conv2d  # the few-channel input layer: see above
            layers.append(conv(in_channels, width, kernel_size=3, padding=padding))
            size = size + 2 * padding - 2
            layers.append(nn.GroupNorm(width, width, affine=True))
            layers.append(nn.ReLU(inplace=False))
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
            size //= 2
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.embed_dim = width * size * size  # 128 * 4 * 4 = 2048 for 32x32 / padded 28x28
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier: (N, C, H, W) -> (N, embed_dim)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _convnet3(channels: int, num_classes: int, im_size: int, width: int) -> nn.Module:
    return ConvNet(channels, num_classes, im_size, width=width, depth=3)


NETWORKS: dict[str, Callable[[int, int, int, int], nn.Module]] = {
    "convnet3": _convnet3,
}


def build_network(
    name: str,
    channels: int,
    num_classes: int,
    im_size: int,
    width: int = 128,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A freshly initialised network from the registry.

    With `generator`, the default torch init is drawn from it (the global RNG is left untouched), so a
    seed fixes the weights.
    """
    if name not in NETWORKS:
        raise KeyError(f"network: {name!r} is not registered; choose one of {sorted(NETWORKS)}")
    if generator is None:
        return NETWORKS[name](channels, num_classes, im_size, width)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NETWORKS[name](channels, num_classes, im_size, width)
