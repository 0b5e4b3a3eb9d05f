"""MomentumSGD against hand-derived float64 sequences and torch.optim.SGD; param_groups classification.

The reference sequences are written out here in plain Python floats, one element at a time, straight
from Goyal et al. (2017), section 3, independently of the optimizer's tensor code. The gradient is
that of a quadratic, g = a * w + b, so each step depends on the trajectory so far.
"""

import copy

import pytest
import torch
from torch import nn

from largebatch.optim import sgd as sgd_module
from largebatch.optim import OPTIMIZERS, MomentumSGD, build_optimizer, is_bn_or_bias, param_groups
from largebatch.optim.registry import LARSOptions, SGDOptions

W0 = [1.5, -0.7, 0.3]
A = [0.9, 2.0, 0.5]
B = [0.1, -0.2, 0.05]
LRS = [0.1, 0.1, 0.4, 0.4, 0.4, 0.05, 0.05, 0.05]  # lr changes up after step 1 and down after step 4
M, WD = 0.9, 1e-2
TIGHT = dict(rtol=1e-12, atol=1e-15)


def hand_lr_inside(lrs, *, correct, nesterov=False, wd=WD, m=M):
    """Goyal eq. (10): v <- m v + lr d, w <- w - v; correction: v <- (lr/lr_old) v when lr changes."""
    out, ws = [], list(W0)
    for i in range(len(ws)):
        w, v, prev, traj = ws[i], 0.0, None, []
        for lr in lrs:
            d = A[i] * w + B[i] + wd * w
            if correct and prev is not None and prev != lr and prev != 0:
                v = v * (lr / prev)
            v = m * v + lr * d
            w = w - (m * v + lr * d if nesterov else v)
            prev = lr
            traj.append(w)
        out.append(traj)
    return torch.tensor(out, dtype=torch.float64).T


def hand_lr_outside(lrs, *, nesterov=False, wd=WD, m=M):
    """Goyal eq. (9), torch.optim.SGD's form: u <- m u + d, w <- w - lr u (Nesterov: w <- w - lr (d + m u))."""
    out = []
    for i in range(len(W0)):
        w, u, traj = W0[i], 0.0, []
        for lr in lrs:
            d = A[i] * w + B[i] + wd * w
            u = m * u + d
            w = w - lr * (d + m * u if nesterov else u)
            traj.append(w)
        out.append(traj)
    return torch.tensor(out, dtype=torch.float64).T


def run(make_opt, lrs, w0=None):
    """The trajectory of w (one row per step) under `make_opt([w])`, lr set before each step."""
    w = (torch.tensor(W0, dtype=torch.float64) if w0 is None else w0.clone()).requires_grad_()
    a, b = torch.tensor(A, dtype=w.dtype), torch.tensor(B, dtype=w.dtype)
    opt = make_opt([w])
    traj = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad = a * w.detach() + b
        opt.step()
        traj.append(w.detach().clone())
    return torch.stack(traj)


def goyal_sgd(**kw):
    return lambda params: MomentumSGD(params, lr=LRS[0], momentum=M, weight_decay=WD, **kw)


def torch_sgd(**kw):
    return lambda params: torch.optim.SGD(params, lr=LRS[0], momentum=M, weight_decay=WD, **kw)


def test_corrected_lr_inside_equals_hand_sequence_and_torch_sgd():
    ours = run(goyal_sgd(), LRS)
    torch.testing.assert_close(ours, hand_lr_inside(LRS, correct=True), **TIGHT)
    # Goyal's claim: with momentum correction the lr-inside form is the lr-outside form.
    torch.testing.assert_close(ours, run(torch_sgd(), LRS), **TIGHT)
    torch.testing.assert_close(ours, hand_lr_outside(LRS), **TIGHT)


def test_float32_goyal_schedule_tracks_torch_sgd():
    """60 steps of gradual warmup then a step decay, in float32: rounding stays at float32 level."""
    lrs = [0.01 + (0.32 - 0.01) * i / 40 for i in range(40)] + [0.32] * 10 + [0.032] * 10
    w0 = torch.tensor(W0, dtype=torch.float32)
    ours = run(goyal_sgd(nesterov=True), lrs, w0)
    torch.testing.assert_close(ours, run(torch_sgd(nesterov=True), lrs, w0), rtol=1e-5, atol=1e-6)


def test_uncorrected_lr_inside_follows_its_own_sequence_and_lags_lr_changes():
    ours = run(goyal_sgd(momentum_correction=False), LRS)
    torch.testing.assert_close(ours, hand_lr_inside(LRS, correct=False), **TIGHT)
    reference = run(torch_sgd(), LRS)
    torch.testing.assert_close(ours[:2], reference[:2], **TIGHT)  # identical while lr is constant
    assert (ours[2:] - reference[2:]).abs().amax(dim=1).min() > 1e-4  # different from the first change on


def test_lr_outside_equals_torch_sgd_and_hand_sequence():
    ours = run(goyal_sgd(lr_in_momentum=False), LRS)
    torch.testing.assert_close(ours, run(torch_sgd(), LRS), **TIGHT)
    torch.testing.assert_close(ours, hand_lr_outside(LRS), **TIGHT)


@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_nesterov_both_forms_equal_torch_nesterov(lr_in_momentum):
    ours = run(goyal_sgd(nesterov=True, lr_in_momentum=lr_in_momentum), LRS)
    torch.testing.assert_close(ours, run(torch_sgd(nesterov=True), LRS), **TIGHT)
    torch.testing.assert_close(ours, hand_lr_outside(LRS, nesterov=True), **TIGHT)
    if lr_in_momentum:
        torch.testing.assert_close(ours, hand_lr_inside(LRS, correct=True, nesterov=True), **TIGHT)


def test_uncorrected_nesterov_follows_hand_sequence():
    ours = run(goyal_sgd(nesterov=True, momentum_correction=False), LRS)
    torch.testing.assert_close(ours, hand_lr_inside(LRS, correct=False, nesterov=True), **TIGHT)


def test_momentum_zero_is_plain_sgd_without_state():
    ours = run(lambda p: MomentumSGD(p, lr=0.1, momentum=0, weight_decay=WD), LRS)
    torch.testing.assert_close(ours, hand_lr_outside(LRS, m=0.0), **TIGHT)
    opt = MomentumSGD([nn.Parameter(torch.ones(2))], lr=0.1, momentum=0)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    assert len(opt.state) == 0


def test_warmup_from_lr_zero_keeps_buffers_finite():
    lrs = [0.0, 0.0, 0.2, 0.4]
    ours = run(goyal_sgd(), lrs)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, hand_lr_inside(lrs, correct=True), **TIGHT)
    assert torch.equal(ours[1], torch.tensor(W0, dtype=torch.float64))  # lr 0 moves nothing


def test_weight_decay_per_group():
    def groups(params):
        decayed, free = nn.Parameter(torch.tensor(W0, dtype=torch.float64)), params[0]
        return [dict(params=[free], weight_decay=0.0), dict(params=[decayed], weight_decay=WD)]

    traj = {}
    for name, cls, kw in [("ours", MomentumSGD, {}), ("torch", torch.optim.SGD, {})]:
        free_w = torch.tensor(W0, dtype=torch.float64).requires_grad_()
        opt = cls(groups([free_w]), lr=LRS[0], momentum=M, **kw)
        decayed_w = opt.param_groups[1]["params"][0]
        rows = []
        for lr in LRS:
            for group in opt.param_groups:
                group["lr"] = lr
            for w in (free_w, decayed_w):
                w.grad = torch.tensor(A, dtype=torch.float64) * w.detach() + torch.tensor(B, dtype=torch.float64)
            opt.step()
            rows.append(torch.stack([free_w.detach().clone(), decayed_w.detach().clone()]))
        traj[name] = torch.stack(rows)
    torch.testing.assert_close(traj["ours"], traj["torch"], **TIGHT)
    torch.testing.assert_close(traj["ours"][:, 0], hand_lr_inside(LRS, correct=True, wd=0.0), **TIGHT)
    torch.testing.assert_close(traj["ours"][:, 1], hand_lr_inside(LRS, correct=True, wd=WD), **TIGHT)


@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_state_dict_round_trip_mid_run_continues_identically(lr_in_momentum):
    """Saved after step 2 (lr 0.1); the continuation starts with an lr change, which needs the saved lr."""
    make = goyal_sgd(lr_in_momentum=lr_in_momentum, nesterov=True)
    uninterrupted = run(make, LRS)

    w = torch.tensor(W0, dtype=torch.float64).requires_grad_()
    opt = make([w])
    a, b = torch.tensor(A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64)

    def steps(opt, w, lrs):
        rows = []
        for lr in lrs:
            opt.param_groups[0]["lr"] = lr
            w.grad = a * w.detach() + b
            opt.step()
            rows.append(w.detach().clone())
        return rows

    first = steps(opt, w, LRS[:2])
    saved = copy.deepcopy(opt.state_dict())
    if lr_in_momentum:
        assert saved["state"][0]["momentum_lr"] == 0.1
    w2 = w.detach().clone().requires_grad_()
    opt2 = make([w2])
    opt2.load_state_dict(saved)
    rest = steps(opt2, w2, LRS[2:])
    assert torch.equal(torch.stack(first + rest), uninterrupted)


def test_params_without_grad_are_untouched_and_correction_stays_exact():
    """A parameter that skips the step where lr changes is still corrected by the right ratio later."""
    results = {}
    for name, cls in [("ours", MomentumSGD), ("torch", torch.optim.SGD)]:
        p, q = (nn.Parameter(torch.tensor(W0, dtype=torch.float64)) for _ in range(2))
        opt = cls([p, q], lr=0.1, momentum=M, weight_decay=WD)
        rows = []
        for step, lr in enumerate(LRS):
            opt.param_groups[0]["lr"] = lr
            p.grad = torch.full_like(p, 0.3) + p.detach()
            q.grad = None if step in (2, 3) else torch.full_like(q, -0.2) + q.detach()
            q_before = q.detach().clone()
            opt.step()
            if q.grad is None:
                assert torch.equal(q.detach(), q_before)
            rows.append(torch.stack([p.detach().clone(), q.detach().clone()]))
        results[name] = torch.stack(rows)
    torch.testing.assert_close(results["ours"], results["torch"], **TIGHT)

    never = nn.Parameter(torch.ones(3))
    opt = MomentumSGD([never], lr=0.1)
    opt.step()
    assert torch.equal(never.detach(), torch.ones(3)) and len(opt.state) == 0


@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_foreach_false_matches_foreach_bitwise(lr_in_momentum):
    kw = dict(lr_in_momentum=lr_in_momentum, nesterov=True)
    assert torch.equal(run(goyal_sgd(foreach=True, **kw), LRS), run(goyal_sgd(foreach=False, **kw), LRS))


@pytest.mark.parametrize(("foreach", "calls"), [(None, 3), (False, 3), (True, 1)])
def test_foreach_none_steps_cpu_tensors_one_at_a_time(monkeypatch, foreach, calls):
    seen = []
    monkeypatch.setattr(sgd_module, "_update", lambda params, *args, **kw: seen.append(len(params)))
    params = [nn.Parameter(torch.ones(2)) for _ in range(3)]
    for p in params:
        p.grad = torch.ones(2)
    MomentumSGD(params, lr=0.1, foreach=foreach).step()
    assert len(seen) == calls and sum(seen) == 3


def test_mixed_dtypes_in_one_group():
    p32, p64 = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = MomentumSGD([p32, p64], lr=0.5, weight_decay=0.1)
    for lr in (0.5, 1.0):
        opt.param_groups[0]["lr"] = lr
        p32.grad, p64.grad = torch.ones(4), torch.ones(4, dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(p32.detach().double(), p64.detach(), rtol=1e-6, atol=0)
    assert p32.dtype == torch.float32 and p64.dtype == torch.float64


@pytest.mark.parametrize(("kw", "message"), [
    (dict(lr=-0.1), "lr = -0.1"),
    (dict(momentum=1.0), r"momentum = 1.0 .*\[0, 1\)"),
    (dict(weight_decay=-1e-4), "weight_decay = -0.0001"),
    (dict(momentum=0.0, nesterov=True), "nesterov"),
])
def test_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        MomentumSGD([nn.Parameter(torch.ones(1))], **{"lr": 0.1, **kw})


def test_sparse_grad_rejected():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        MomentumSGD([p], lr=0.1).step()


def test_closure_loss_returned():
    p = nn.Parameter(torch.tensor([2.0]))
    opt = MomentumSGD([p], lr=0.1, momentum=0.0)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 4.0
    assert p.item() == pytest.approx(2.0 - 0.1 * 4.0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.fc = nn.Linear(4, 2)


def test_param_groups_conv_bn_linear():
    net = Net()
    groups = param_groups(net, 5e-5, exclude_bn_bias=True)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [5e-5, 0.0]
    ids = lambda ps: [id(p) for p in ps]  # noqa: E731
    assert ids(groups[0]["params"]) == ids([net.conv.weight, net.conv2.weight, net.fc.weight])
    assert ids(groups[1]["params"]) == ids([net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias])

    (single,) = param_groups(net, 5e-5, exclude_bn_bias=False)
    assert single["name"] == "decay" and ids(single["params"]) == ids(net.parameters())


def test_param_groups_norm_types_shared_and_empty_groups():
    ln, gn = nn.LayerNorm([4, 4]), nn.GroupNorm(2, 4)  # 2-D LayerNorm weight: caught by type, not ndim
    lin = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(lin, ln, gn, nn.Sequential(lin))  # lin shared: listed once
    groups = param_groups(model, 1e-4, exclude_bn_bias=True)
    assert [len(g["params"]) for g in groups] == [1, 4]
    assert ln.weight.ndim == 2 and is_bn_or_bias(ln, "weight") and is_bn_or_bias(gn, "weight")
    assert not is_bn_or_bias(lin, "weight")

    scale = nn.Module()
    scale.gamma = nn.Parameter(torch.ones(8))  # a 1-D per-channel scale outside a norm layer
    assert is_bn_or_bias(scale, "gamma")
    assert [g["name"] for g in param_groups(nn.BatchNorm1d(3), 1e-4, exclude_bn_bias=True)] == ["no_decay"]
    with pytest.raises(ValueError, match="weight_decay = -1"):
        param_groups(model, -1, exclude_bn_bias=True)


def test_build_optimizer_uses_group_weight_decay():
    net = Net()
    opt = build_optimizer("sgd", param_groups(net, 1e-4, True), lr=0.2,
                          options=SGDOptions(momentum=0.9, nesterov=True, momentum_correction=False))
    assert isinstance(opt, MomentumSGD) and tuple(OPTIMIZERS) == ("sgd", "lars", "lamb")
    assert [(g["name"], g["weight_decay"], g["lr"], g["nesterov"], g["momentum_correction"])
            for g in opt.param_groups] == [("decay", 1e-4, 0.2, True, False), ("no_decay", 0.0, 0.2, True, False)]
    with pytest.raises(ValueError, match="optimizer = 'adam' .*'sgd'"):
        build_optimizer("adam", net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="SGDOptions"):
        build_optimizer("sgd", net.parameters(), lr=0.1, options=LARSOptions())
