"""Tests for largebatch.models: registry, ghost BN and zero-γ residual init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

from largebatch.models import (
    MODELS,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    build_model,
    convert_to_ghost_bn,
    zero_init_last_bn_gamma,
)
from largebatch.models import cifar_resnet


pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# --------------------------------------------------------------------------------- registry


def test_models_names() -> None:
    assert MODELS == ("small_cnn", "resnet20", "resnet56", "resnet18", "resnet50", "alexnet_bn")


_SHAPE_CASES = [
    (name, in_channels, image_size)
    for name in MODELS
    for in_channels, image_size in ((1, 28), (3, 32))
    if name != "resnet50" or in_channels == 3  # resnet50 is slow on CPU: one case is enough
]


@pytest.mark.parametrize("name,in_channels,image_size", _SHAPE_CASES)
def test_build_forward_backward(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    batch = 1 if name == "resnet50" else 2  # alexnet_bn's BatchNorm1d needs 2 samples
    out = model(torch.randn(batch, in_channels, image_size, image_size))
    assert out.shape == (batch, 7)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert _bn_layers(model), "every model keeps BatchNorm layers"


@pytest.mark.parametrize("name", ["resnet18", "alexnet_bn"])
def test_build_imagenet_size(name: str) -> None:
    model = build_model(name, num_classes=5, in_channels=3, image_size=224)
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 5)
    out.sum().backward()


def test_resnet50_parameter_count() -> None:
    model = build_model("resnet50", num_classes=1000, in_channels=3, image_size=224)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


def test_small_image_stem_and_in_channels() -> None:
    small = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.in_channels == 1 and isinstance(small.maxpool, nn.Identity)
    large = build_model("resnet18", num_classes=10, in_channels=1, image_size=224)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.in_channels == 1
    assert isinstance(large.maxpool, nn.MaxPool2d)


def test_unknown_model_name_lists_choices() -> None:
    with pytest.raises(ValueError) as info:
        build_model("vgg16", num_classes=10, in_channels=3, image_size=32)
    message = str(info.value)
    assert "vgg16" in message
    assert all(name in message for name in MODELS)


def test_build_model_bn_options_and_ghost() -> None:
    model = build_model(
        "alexnet_bn", num_classes=10, in_channels=1, image_size=28,
        bn_batch=4, bn_momentum=0.03, bn_eps=1e-3,
    )
    bns = _bn_layers(model)
    assert all(isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d)) for m in bns)
    assert all(m.bn_batch == 4 and m.momentum == 0.03 and m.eps == 1e-3 for m in bns)
    assert model(torch.randn(8, 1, 28, 28)).shape == (8, 10)
    with pytest.raises(ValueError, match="multiple"):
        model(torch.randn(6, 1, 28, 28))
    plain = build_model("small_cnn", num_classes=10, in_channels=1, image_size=28)
    assert all(type(m) is nn.BatchNorm2d for m in _bn_layers(plain))


def _without_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "alexnet_bn"])
def test_ghost_model_equals_model_run_per_chunk(name: str) -> None:
    """A ghost-BN model on k·n samples == the plain model on each n-sample chunk (train mode)."""
    torch.manual_seed(0)
    plain = build_model(name, num_classes=10, in_channels=1, image_size=28)
    ghost = build_model(name, num_classes=10, in_channels=1, image_size=28, bn_batch=4)
    ghost.load_state_dict(plain.state_dict())
    plain, ghost = _without_dropout(plain.double()), _without_dropout(ghost.double())
    x = torch.randn(12, 1, 28, 28, dtype=torch.float64)
    expected = torch.cat([plain(chunk) for chunk in x.split(4)])
    torch.testing.assert_close(ghost(x), expected, rtol=1e-9, atol=1e-9)


# -------------------------------------------------------------------------------- ghost BN


def _reference_ghost_bn(x, weight, bias, bn_batch, eps):
    """Independent reference: the BN formula written out on each chunk, one chunk at a time."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    chunks = []
    for chunk in x.split(bn_batch):
        mean = chunk.mean(dims, keepdim=True)
        y = (chunk - mean) / torch.sqrt(((chunk - mean) ** 2).mean(dims, keepdim=True) + eps)
        y = y * weight.view(shape) if weight is not None else y
        chunks.append(y + bias.view(shape) if bias is not None else y)
    return torch.cat(chunks)


def _expected_running_stats(x, bn_batch, momentum, mean0, var0):
    """The documented rule: mean over groups of per-group mean / unbiased variance."""
    dims = [0] + list(range(2, x.dim()))
    chunks = x.detach().split(bn_batch)
    mean = torch.stack([c.mean(dims) for c in chunks]).mean(0)
    var = torch.stack([c.var(dims, correction=1) for c in chunks]).mean(0)
    return (1 - momentum) * mean0 + momentum * mean, (1 - momentum) * var0 + momentum * var


@pytest.mark.parametrize(
    "cls,shape", [(GhostBatchNorm2d, (12, 5, 4, 3)), (GhostBatchNorm1d, (12, 5)),
                  (GhostBatchNorm1d, (12, 5, 6))]
)
def test_ghost_bn_matches_per_chunk_reference(cls, shape) -> None:
    torch.manual_seed(0)
    bn_batch, eps = 4, 1e-5
    bn = cls(shape[1], eps=eps, bn_batch=bn_batch).double()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    grad_out = torch.randn(shape, dtype=torch.float64)

    out = bn(x)
    gx, gw, gb = torch.autograd.grad(out, (x, bn.weight, bn.bias), grad_out)

    w_ref = bn.weight.detach().clone().requires_grad_()
    b_ref = bn.bias.detach().clone().requires_grad_()
    ref = _reference_ghost_bn(x, w_ref, b_ref, bn_batch, eps)
    rx, rw, rb = torch.autograd.grad(ref, (x, w_ref, b_ref), grad_out)

    for got, want in ((out, ref), (gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_ghost_bn_output_dtype_and_float32_accuracy() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5)
    out = GhostBatchNorm2d(3, bn_batch=8)(x)
    assert out.dtype == torch.float32
    ref = _reference_ghost_bn(x.double(), None, None, 8, 1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_running_stats(momentum) -> None:
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, momentum=momentum, bn_batch=2).double()
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in (1, 2, 3):
        x = torch.randn(6, 3, 2, 2, dtype=torch.float64) * step + step
        bn(x)
        factor = 1.0 / step if momentum is None else momentum
        mean, var = _expected_running_stats(x, 2, factor, mean, var)
        assert bn.num_batches_tracked.item() == step
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)


def _bn_pair(bn_batch: int) -> tuple[nn.BatchNorm2d, GhostBatchNorm2d]:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    with torch.no_grad():
        plain.weight.normal_()
        plain.bias.normal_()
        plain.running_mean.normal_()
        plain.running_var.uniform_(0.5, 2.0)
    ghost = GhostBatchNorm2d(4, bn_batch=bn_batch)
    ghost.load_state_dict(plain.state_dict())
    return plain, ghost


def test_ghost_bn_eval_equals_batchnorm() -> None:
    plain, ghost = _bn_pair(bn_batch=2)
    plain.eval(), ghost.eval()
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("bn_batch,n", [(0, 8), (8, 8), (16, 8)])
def test_ghost_bn_single_group_is_plain_batchnorm(bn_batch: int, n: int) -> None:
    plain, ghost = _bn_pair(bn_batch)
    x = torch.randn(n, 4, 3, 3)
    torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=0)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value, rtol=0, atol=0)


def test_ghost_bn_rejects_non_multiple_batch() -> None:
    bn = GhostBatchNorm2d(3, bn_batch=4)
    with pytest.raises(ValueError, match="not a multiple of bn_batch=4"):
        bn(torch.randn(10, 3, 2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        GhostBatchNorm2d(3, bn_batch=-1)


def test_ghost_bn_state_dict_compatible() -> None:
    plain, ghost = _bn_pair(bn_batch=2)
    assert list(ghost.state_dict()) == list(plain.state_dict())
    nn.BatchNorm2d(4).load_state_dict(ghost.state_dict(), strict=True)
    assert isinstance(ghost, nn.BatchNorm2d)


def test_convert_to_ghost_bn_on_torchvision_resnet18() -> None:
    torch.manual_seed(0)
    model = tv_resnet.resnet18(weights=None, num_classes=10)
    for bn in _bn_layers(model):
        bn.momentum, bn.eps = 0.05, 1e-4
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.weight.normal_()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    params_before = dict(model.named_parameters())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    converted = convert_to_ghost_bn(model, 32)

    assert converted is model
    bns = _bn_layers(model)
    assert len(bns) == 20 and all(type(m) is GhostBatchNorm2d for m in bns)
    assert all(m.bn_batch == 32 and m.momentum == 0.05 and m.eps == 1e-4 for m in bns)
    assert all(not m.training for m in bns)
    assert all(params_before[k] is p for k, p in model.named_parameters())
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("without", ["bias", "affine", "running_stats"])
def test_convert_to_ghost_bn_keeps_missing_tensors(without: str) -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3, affine=without != "affine",
                           track_running_stats=without != "running_stats")
    if without == "bias":  # what nn.BatchNorm2d(..., bias=False) builds on newer torch
        plain.register_parameter("bias", None)
    ghost = convert_to_ghost_bn(plain, 2)
    assert [n for n, _ in ghost.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(ghost.state_dict()) == list(plain.state_dict())
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    weight = None if plain.weight is None else plain.weight.double()
    expected = _reference_ghost_bn(x, weight, None, 2, plain.eps)
    torch.testing.assert_close(ghost.double()(x), expected, rtol=1e-10, atol=1e-10)


def test_convert_to_ghost_bn_skips_syncbn_and_updates_ghost() -> None:
    model = nn.Sequential(nn.SyncBatchNorm(3), GhostBatchNorm2d(3, bn_batch=2), nn.BatchNorm1d(3))
    convert_to_ghost_bn(model, 8)
    assert type(model[0]) is nn.SyncBatchNorm
    assert model[1].bn_batch == 8
    assert type(model[2]) is GhostBatchNorm1d and model[2].bn_batch == 8


# ------------------------------------------------------------------------------- zero-γ


def _last_bns_and_shortcuts(model: nn.Module):
    """(block, last BN, shortcut) for every residual block, written independently of init.py."""
    for m in model.modules():
        if isinstance(m, tv_resnet.Bottleneck):
            yield m, m.bn3, m.downsample or nn.Identity()
        elif isinstance(m, tv_resnet.BasicBlock):
            yield m, m.bn2, m.downsample or nn.Identity()
        elif isinstance(m, cifar_resnet.BasicBlock):
            yield m, m.bn2, m.shortcut


@pytest.mark.parametrize(
    "name,expected", [("resnet18", 8), ("resnet50", 16), ("resnet20", 9), ("resnet56", 27)]
)
def test_zero_init_residual(name: str, expected: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=32, zero_init_residual=True)
    blocks = list(_last_bns_and_shortcuts(model))
    assert len(blocks) == expected
    zero_ids = {id(bn.weight) for _, bn, _ in blocks}
    for bn in _bn_layers(model):
        assert bool((bn.weight == 0).all()) == (id(bn.weight) in zero_ids)
    assert zero_init_last_bn_gamma(model) == expected  # idempotent, returns the count

    # Each block is now relu(shortcut(x)) in eval mode: record block inputs with hooks
    # (a 16×16 input keeps resnet50 cheap; the blocks do not care about the size).
    model.eval()
    seen = []
    hooks = [
        block.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
        for block, _, _ in blocks
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
        shortcuts = {id(block): shortcut for block, _, shortcut in blocks}
        for block, block_in, block_out in seen:
            expected_out = F.relu(shortcuts[id(block)](block_in))
            torch.testing.assert_close(block_out, expected_out, rtol=0, atol=0)
    for hook in hooks:
        hook.remove()
    assert len(seen) == expected


@pytest.mark.parametrize("name", ["small_cnn", "alexnet_bn"])
def test_zero_init_residual_noop_without_blocks(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1, image_size=28, zero_init_residual=True)
    assert zero_init_last_bn_gamma(model) == 0
    assert all((bn.weight == 1).all() for bn in _bn_layers(model))


@pytest.mark.parametrize("channels_last, dtype, affine", [(True, torch.float32, True), (False, torch.bfloat16, True),
                                                          (True, torch.float32, False)])
def test_ghost_bn_keeps_layout_and_dtype_and_matches_the_reference(channels_last, dtype, affine) -> None:
    """The per-group native kernels take channels_last and bf16 inputs (autocast) and affine=False layers."""
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(6, bn_batch=4, affine=affine)
    x = torch.randn(12, 6, 5, 5) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = bn(x.to(dtype))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last) == channels_last
    w = bn.weight.detach().double() if affine else None
    b = bn.bias.detach().double() if affine else None
    ref = _reference_ghost_bn(x.to(dtype).double(), w, b, 4, 1e-5)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tolerance, atol=tolerance)
