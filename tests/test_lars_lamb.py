"""LARS and LAMB against independent float64 per-parameter references written from their formulas.

The references below loop over parameters one tensor at a time with plain tensor arithmetic and
Python-float norms, straight from You et al. (2017/2018, LARS; apex LARC) and You et al. (2019, LAMB)
as documented on the optimizers, independently of their ``torch._foreach_*`` code. A small
Conv2d + BatchNorm2d + Linear net is trained for 10 steps on random data, under a changing lr, by the
optimizer and by the reference, from identical copies.
"""

import copy
import math

import pytest
import torch
from torch import nn

from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.groups import param_groups

TIGHT = dict(rtol=1e-10, atol=1e-14)
LRS = [0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.5]
LAMB_LRS = [1e-2, 1e-2, 2e-2, 2e-2, 2e-2, 1e-2, 1e-2, 5e-3, 5e-3, 5e-3]
STEPS = len(LRS)


def make_net() -> nn.Module:
    torch.manual_seed(0)
    # ReLU before the batch norm: a conv bias directly followed by batch norm has a gradient that is
    # only rounding noise (the norm cancels it), which LARS and LAMB both amplify to O(1) steps.
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 5, bias=True)).double()
    with torch.no_grad():  # batch-norm affine parameters away from their 1 / 0 init, so they have a trajectory
        net[2].weight.uniform_(0.5, 1.5)
        net[2].bias.uniform_(-0.5, 0.5)
    return net


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g))
            for _ in range(n)]


def set_grads(net: nn.Module, batch) -> None:
    net.zero_grad(set_to_none=True)
    x, y = batch
    nn.functional.cross_entropy(net(x), y).backward()


def make_groups(net: nn.Module, wd: float, exclude: bool) -> list[dict]:
    groups = param_groups(net, wd, exclude_bn_bias=exclude)
    for g in groups:
        if g["name"] == "no_decay":
            g["trust"] = False
    return groups


def run_opt(make_opt, *, exclude: bool, wd: float, lrs, data=None):
    net = make_net()
    opt = make_opt(make_groups(net, wd, exclude))
    for lr, batch in zip(lrs, data or batches(len(lrs))):
        for g in opt.param_groups:
            g["lr"] = lr
        set_grads(net, batch)
        opt.step()
    return net, opt


# ---------------------------------------------------------------------------------------------- references

def ref_lars(*, exclude, wd, lrs, momentum=0.9, eta=0.02, eps=0.0, nesterov=False, mode="lars"):
    net = make_net()
    groups = make_groups(net, wd, exclude)
    bufs = {}
    for lr, batch in zip(lrs, batches(len(lrs))):
        set_grads(net, batch)
        with torch.no_grad():
            for group in groups:
                beta, trust = group["weight_decay"], group.get("trust", True)
                for p in group["params"]:
                    g = p.grad
                    w_norm, g_norm = math.sqrt(float((p * p).sum())), math.sqrt(float((g * g).sum()))
                    local = 1.0
                    if trust and w_norm > 0 and g_norm > 0:
                        local = eta * w_norm / (g_norm + beta * w_norm + eps)
                        if mode == "larc_clip":
                            local = min(local / lr, 1.0)
                    d = g + beta * p
                    v = bufs.get(p, torch.zeros_like(p))
                    v = momentum * v + lr * local * d
                    bufs[p] = v
                    p -= (momentum * v + lr * local * d) if nesterov else v
    return net


def ref_lamb(*, exclude, wd, lrs, betas=(0.9, 0.999), eps=1e-6, trust_clip=None, bias_correction=True):
    net = make_net()
    groups = make_groups(net, wd, exclude)
    ms, vs = {}, {}
    b1, b2 = betas
    for t, (lr, batch) in enumerate(zip(lrs, batches(len(lrs))), start=1):
        set_grads(net, batch)
        with torch.no_grad():
            for group in groups:
                lam, trust = group["weight_decay"], group.get("trust", True)
                for p in group["params"]:
                    g = p.grad
                    m = b1 * ms.get(p, torch.zeros_like(p)) + (1 - b1) * g
                    v = b2 * vs.get(p, torch.zeros_like(p)) + (1 - b2) * g * g
                    ms[p], vs[p] = m, v
                    m_hat, v_hat = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if bias_correction else (m, v)
                    u = m_hat / (v_hat.sqrt() + eps) + lam * p
                    w_norm, u_norm = math.sqrt(float((p * p).sum())), math.sqrt(float((u * u).sum()))
                    r = w_norm / u_norm if (trust and w_norm > 0 and u_norm > 0) else 1.0
                    if trust and trust_clip is not None:
                        r = min(r, trust_clip)
                    p -= lr * r * u
    return net


def assert_same_params(a: nn.Module, b: nn.Module, **tol) -> None:
    tol = tol or TIGHT
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, **tol, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- LARS

LARS_CASES = [
    dict(exclude=False, wd=1e-2, nesterov=False, mode="lars"),
    dict(exclude=True, wd=1e-2, nesterov=False, mode="lars"),
    dict(exclude=True, wd=1e-2, nesterov=True, mode="lars"),
    dict(exclude=False, wd=0.0, nesterov=True, mode="lars"),
    dict(exclude=False, wd=5e-3, nesterov=False, mode="larc_clip", eta=0.1),
    dict(exclude=True, wd=5e-3, nesterov=True, mode="larc_clip", eta=0.1),
    dict(exclude=False, wd=5e-3, nesterov=False, mode="larc_scale"),
]


@pytest.mark.parametrize("case", LARS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_lars_matches_reference(case):
    net, opt = run_opt(lambda gs: LARS(gs, lr=LRS[0], momentum=0.9, weight_decay=case["wd"],
                                       trust_coefficient=case.get("eta", 0.02), nesterov=case["nesterov"],
                                       mode=case["mode"]),
                       exclude=case["exclude"], wd=case["wd"], lrs=LRS)
    ref = ref_lars(lrs=LRS, **case)
    assert_same_params(net, ref)
    assert not torch.equal(next(net.parameters()), next(make_net().parameters()))
    for group in opt.param_groups:
        for p in group["params"]:
            loc = opt.state[p]["local_lr"]
            assert loc.ndim == 0 and loc.dtype == p.dtype
            if not group["trust"]:
                assert loc.item() == 1.0


def test_larc_clip_clips_some_layers_only():
    """The clip case above is a real test: at the last step some layers are clipped (local 1) and some not."""
    _, opt = run_opt(lambda gs: LARS(gs, lr=LRS[0], weight_decay=5e-3, trust_coefficient=0.1, mode="larc_clip"),
                     exclude=False, wd=5e-3, lrs=LRS)
    locs = [opt.state[p]["local_lr"].item() for p in opt.param_groups[0]["params"]]
    assert any(v == 1.0 for v in locs) and any(v < 1.0 for v in locs)
    assert all(0 < v <= 1.0 for v in locs)


def test_lars_momentum_zero_and_eps():
    net, _ = run_opt(lambda gs: LARS(gs, lr=LRS[0], momentum=0.0, weight_decay=1e-2, trust_coefficient=0.02, eps=1e-3),
                     exclude=True, wd=1e-2, lrs=LRS)
    assert_same_params(net, ref_lars(exclude=True, wd=1e-2, lrs=LRS, momentum=0.0, eps=1e-3))


def test_lars_zero_norm_gives_local_lr_one():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # ||w|| = 0
    u = torch.ones(3, dtype=torch.float64, requires_grad=True)  # ||g|| = 0
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)  # both > 0
    opt = LARS([w, u, x], lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.01)
    w.grad = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    u.grad = torch.zeros(3, dtype=torch.float64)
    x.grad = torch.full((2,), 2.0, dtype=torch.float64)
    opt.step()
    assert opt.state[w]["local_lr"].item() == 1.0
    assert opt.state[u]["local_lr"].item() == 1.0
    assert opt.state[x]["local_lr"].item() == pytest.approx(0.01 * math.sqrt(2) / math.sqrt(8))
    torch.testing.assert_close(w.detach(), -0.1 * torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(u.detach(), torch.ones(3, dtype=torch.float64))


def test_lars_skips_params_without_grad():
    a = torch.ones(2, dtype=torch.float64, requires_grad=True)
    b = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = LARS([a, b], lr=0.1)
    a.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(2, dtype=torch.float64))
    assert "momentum_buffer" in opt.state[a]


def test_lars_rejects_bad_options():
    p = [torch.zeros(1, requires_grad=True)]
    for kw in (dict(mode="larc"), dict(momentum=1.0), dict(lr=-1.0), dict(weight_decay=-1.0),
               dict(trust_coefficient=0.0), dict(momentum=0.0, nesterov=True)):
        with pytest.raises(ValueError):
            LARS(p, **{"lr": 0.1, **kw})


# ---------------------------------------------------------------------------------------------- LAMB

LAMB_CASES = [
    dict(exclude=False, wd=1e-2, trust_clip=None),
    dict(exclude=True, wd=1e-2, trust_clip=None),
    dict(exclude=False, wd=1e-2, trust_clip=1.0),
    dict(exclude=True, wd=0.0, trust_clip=2.0),
    dict(exclude=True, wd=1e-2, trust_clip=None, bias_correction=False),
]


@pytest.mark.parametrize("case", LAMB_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_lamb_matches_reference(case):
    net, opt = run_opt(lambda gs: LAMB(gs, lr=LAMB_LRS[0], weight_decay=case["wd"], trust_clip=case["trust_clip"],
                                       bias_correction=case.get("bias_correction", True)),
                       exclude=case["exclude"], wd=case["wd"], lrs=LAMB_LRS)
    assert_same_params(net, ref_lamb(lrs=LAMB_LRS, **case))
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            assert st["step"] == STEPS and st["trust_ratio"].ndim == 0
            if case["trust_clip"] is not None:
                assert st["trust_ratio"].item() <= case["trust_clip"]


def test_lamb_trust_clip_is_active():
    """With trust_clip=1 some trust ratios are clipped, so the clip case above differs from the unclipped one."""
    _, opt = run_opt(lambda gs: LAMB(gs, lr=LAMB_LRS[0], weight_decay=1e-2), exclude=False, wd=1e-2, lrs=LAMB_LRS)
    assert any(opt.state[p]["trust_ratio"].item() > 1.0 for p in opt.param_groups[0]["params"])


def test_lamb_zero_norm_gives_ratio_one():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = LAMB([w], lr=0.1)
    w.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt.step()
    assert opt.state[w]["trust_ratio"].item() == 1.0
    # First bias-corrected Adam step: m_hat / sqrt(v_hat) = sign(g).
    torch.testing.assert_close(w.detach(), -0.1 * torch.sign(w.grad) / (1 + 1e-6 / w.grad.abs()))


# ---------------------------------------------------------------------------------------------- state_dict

@pytest.mark.parametrize("make_opt", [
    lambda gs: LARS(gs, lr=LRS[0], weight_decay=1e-2, trust_coefficient=0.02, nesterov=True),
    lambda gs: LARS(gs, lr=LRS[0], weight_decay=1e-2, trust_coefficient=0.02, mode="larc_clip"),
    lambda gs: LAMB(gs, lr=LRS[0] * 1e-2, weight_decay=1e-2, trust_clip=5.0),
], ids=["lars", "larc_clip", "lamb"])
def test_state_dict_round_trip_continues_identically(make_opt):
    data, half = batches(), STEPS // 2

    def train(net, opt, steps):
        for i in steps:
            for g in opt.param_groups:
                g["lr"] = LRS[i] * (1e-2 if isinstance(opt, LAMB) else 1.0)
            set_grads(net, data[i])
            opt.step()

    net_a = make_net()
    opt_a = make_opt(make_groups(net_a, 1e-2, True))
    train(net_a, opt_a, range(STEPS))

    net_b = make_net()
    opt_b = make_opt(make_groups(net_b, 1e-2, True))
    train(net_b, opt_b, range(half))
    saved_model, saved_opt = copy.deepcopy(net_b.state_dict()), copy.deepcopy(opt_b.state_dict())

    net_c = make_net()
    net_c.load_state_dict(saved_model)
    opt_c = make_opt(make_groups(net_c, 0.5, True))  # the loaded groups' options replace these
    for g in opt_c.param_groups:
        g["trust"] = True
    opt_c.load_state_dict(saved_opt)
    assert [g["trust"] for g in opt_c.param_groups] == [True, False]
    train(net_c, opt_c, range(half, STEPS))
    for pa, pc in zip(net_a.parameters(), net_c.parameters()):
        assert torch.equal(pa, pc)


# ---------------------------------------------------------------------------------------------- timm

def test_lars_matches_timm():
    timm_optim = pytest.importorskip("timm.optim")
    lrs = [0.5] * STEPS  # timm keeps lr outside the buffer; the two forms agree while lr is fixed
    for nesterov, clip in ((False, False), (True, False), (False, True)):
        mode = "larc_clip" if clip else "lars"
        net, _ = run_opt(lambda gs: LARS(gs, lr=0.5, weight_decay=1e-2, trust_coefficient=0.02, eps=1e-8,
                                         nesterov=nesterov, mode=mode), exclude=False, wd=1e-2, lrs=lrs)
        ref, _ = run_opt(lambda gs: timm_optim.Lars(gs, lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coeff=0.02,
                                                    eps=1e-8, nesterov=nesterov, trust_clip=clip,
                                                    always_adapt=True), exclude=False, wd=1e-2, lrs=lrs)
        assert_same_params(net, ref, rtol=1e-9, atol=1e-12)


def test_lamb_matches_timm():
    timm_optim = pytest.importorskip("timm.optim")
    for clip in (None, 1.0):
        net, _ = run_opt(lambda gs: LAMB(gs, lr=1e-2, weight_decay=1e-2, trust_clip=clip),
                         exclude=False, wd=1e-2, lrs=LAMB_LRS)
        ref, _ = run_opt(lambda gs: timm_optim.Lamb(gs, lr=1e-2, weight_decay=1e-2, max_grad_norm=None,
                                                    trust_clip=clip is not None, always_adapt=True),
                         exclude=False, wd=1e-2, lrs=LAMB_LRS)
        assert_same_params(net, ref, rtol=1e-9, atol=1e-12)
