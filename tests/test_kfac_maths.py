"""K-FAC maths (`largebatch.optim.kfac`, `largebatch.dist.kfac_comm`) against float64 brute force.

Every reference here is built independently of the code under test, with explicit loops:

- Factors (`pre.factors` after one step) against the expectations of `layers.py`'s docstring:
  A = 1/N Σ_n Σ_t ā_nt ā_ntᵀ, with ā cut by hand out of the zero-padded input (no F.unfold), and
  G = 1/N Σ_n 1/T Σ_t Ds_nt Ds_ntᵀ, with Ds_n = ∂ℓ_n/∂s from a backward of example n's own loss
  ℓ_n alone (autograd.grad of ℓ_n w.r.t. the layer output captured by a forward hook); the
  BatchNorm per-channel 2 × 2 Fisher from x̂ normalised by hand (biased variance, per ghost group).
  The hand-made ā are also checked to give the model's own ∇W = 1/N Σ_n Σ_t Ds_nt ā_ntᵀ.
  A layer *upstream* of a training-mode BatchNorm has no "own-loss" output gradient of its example
  alone (the batch statistics couple the examples: ∂ℓ_m/∂s_n ≠ 0 for m ≠ n), and the docstring says
  the per-example Ds are the slices of the training loss's gradient (the empirical Fisher, as
  kfac-pytorch), Ds_n = N·(∂L/∂s)[n]; for those layers only, that is the reference. Everywhere else
  the two definitions coincide and the own-loss backward is used.
- The preconditioned gradient against a dense solve with the Kronecker product formed explicitly:
  (A ⊗ G + λI)⁻¹ vec(∇W) ("exact"), (A + π√λ I) ⊗ (G + √λ/π I) ("pi"), vec stacking columns;
  BatchNorm against a dense 2 × 2 solve per channel.
- Eigen against Cholesky inverses; KL clipping against ν computed here; gradient accumulation
  against one big batch; running averages against d·F1 + (1 − d)·F2; the Cholesky damping retry;
  triangle packing and the owner assignment against their stated properties; the schedule
  against step lists written out by hand.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.dist.env import Collectives, DistEnv
from largebatch.dist.kfac_comm import KFACComm, assign_owners, pack_triangles, unpack_triangles
from largebatch.models.ghost_bn import GhostBatchNorm2d
from largebatch.optim.kfac import KFACOptions, KFACPreconditioner, interval
from largebatch.optim.kfac.inverse import FactorError, invert_kronecker

N = 6
TIGHT = dict(rtol=1e-10, atol=1e-13)
BN_TYPES = (nn.BatchNorm2d,)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- models and data


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    elif kind == "conv_bn":  # conv upstream of BN: the conv's examples are coupled by BN statistics
        model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                              nn.Flatten(), nn.Linear(27, 4))
    elif kind == "conv_ghost":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), GhostBatchNorm2d(3, bn_batch=3),
                              nn.Tanh(), nn.Flatten(), nn.Linear(27, 4))
    elif kind == "bn_conv":  # BN first: every layer has an own-loss output gradient
        model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False),
                              nn.Tanh(), nn.Flatten(), nn.Linear(27, 4))
    else:
        raise ValueError(kind)
    model = model.double().train()
    with torch.no_grad():  # BN's γ, β away from (1, 0) so that nothing is accidentally symmetric
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def make_data(kind: str, n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
    else:
        x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64) * 1.5 + 0.3
        y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def make_pre(model: nn.Module, **options) -> KFACPreconditioner:
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                  backend=None)
    defaults = dict(damping=1e-2, damping_mode="exact", decay=0.9, inverse_method="eigen", kl_clip=0.0,
                    inverse_dtype=torch.float64)
    defaults.update(options)
    return KFACPreconditioner(model, KFACOptions(**defaults), KFACComm(Collectives(env)))


def kfac_step(pre: KFACPreconditioner, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int = 0) -> None:
    """One step of the documented single-process use, up to update_factors."""
    model.zero_grad(set_to_none=False)
    pre.begin_step(step, grad_scale=x.shape[0])
    F.cross_entropy(model(x), y).backward()
    pre.update_factors()


def kronecker_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]


# ----------------------------------------------------------------------------- brute-force reference


def patches_by_hand(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ā per example and position, N × T × in(+1): for Linear the input row; for Conv2d the zero-padded
    input's window at each output position, flattened in (channel, kh, kw) order; a trailing 1 for a bias."""
    n = x.shape[0]
    if isinstance(module, nn.Linear):
        rows = [[x[i].clone()] for i in range(n)]
    else:
        (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
        assert module.dilation == (1, 1)
        c, h, w = x.shape[1:]
        padded = torch.zeros(n, c, h + 2 * ph, w + 2 * pw, dtype=x.dtype)
        padded[:, :, ph:ph + h, pw:pw + w] = x
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        rows = []
        for i in range(n):
            per = []
            for oi in range(ho):
                for oj in range(wo):
                    window = padded[i, :, oi * sh:oi * sh + kh, oj * sw:oj * sw + kw]
                    per.append(window.reshape(-1))  # (channel, kh, kw) order, as weight.reshape(out, -1)
            rows.append(per)
    out = torch.stack([torch.stack(per) for per in rows])
    if module.bias is not None:
        out = torch.cat([out, torch.ones(*out.shape[:2], 1, dtype=out.dtype)], -1)
    return out


def output_rows(ds: torch.Tensor) -> torch.Tensor:
    """Ds of one example as T × out (positions in row-major order, as `patches_by_hand`)."""
    if ds.dim() == 1:
        return ds[None]
    c = ds.shape[0]
    return torch.stack([ds[:, i, j] for i in range(ds.shape[1]) for j in range(ds.shape[2])]).reshape(-1, c)


def upstream_of_bn(model: nn.Module, name: str) -> bool:
    """Whether a training-mode BatchNorm comes after module `name` in this Sequential."""
    names = [n for n, _ in model.named_children()]
    idx = names.index(name)
    return any(isinstance(m, BN_TYPES) for m in list(model.children())[idx + 1:])


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Brute-force factors, ∇W (with bias column) and BN gradients of a fresh copy of `model` at (x, y)."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    inputs, outputs = {}, {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d) + BN_TYPES):
            def hook(mod, inp, out, name=name):
                inputs[name], outputs[name] = inp[0].detach(), out
            handles.append(m.register_forward_hook(hook))
    losses = F.cross_entropy(model(x), y, reduction="none")
    for h in handles:
        h.remove()
    n = x.shape[0]
    names = list(outputs)
    # Ds_n from example n's own loss alone
    own = {name: [] for name in names}
    for i in range(n):
        grads = torch.autograd.grad(losses[i], [outputs[k] for k in names], retain_graph=True)
        for name, g in zip(names, grads):
            own[name].append(g[i])
    # the training loss's gradient, sliced per example and times N (for layers upstream of BN)
    grads = torch.autograd.grad(losses.mean(), [outputs[k] for k in names], retain_graph=True)
    batch = {name: [n * g[i] for i in range(n)] for name, g in zip(names, grads)}
    losses.mean().backward()

    result = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            abar = patches_by_hand(m, inputs[name])  # N × T × in
            T = abar.shape[1]
            ds = batch[name] if upstream_of_bn(model, name) else own[name]
            d_rows = [output_rows(d) for d in ds]  # N × (T × out)
            batch_rows = [output_rows(d) for d in batch[name]]
            a = torch.zeros(abar.shape[-1], abar.shape[-1], dtype=torch.float64)
            g = torch.zeros(m.weight.shape[0], m.weight.shape[0], dtype=torch.float64)
            grad_w = torch.zeros(m.weight.shape[0], abar.shape[-1], dtype=torch.float64)
            for i in range(n):
                for t in range(T):
                    a += torch.outer(abar[i, t], abar[i, t])
                    g += torch.outer(d_rows[i][t], d_rows[i][t]) / T
                    grad_w += torch.outer(batch_rows[i][t], abar[i, t])
            model_grad = m.weight.grad.reshape(m.weight.shape[0], -1)
            if m.bias is not None:
                model_grad = torch.cat([model_grad, m.bias.grad[:, None]], 1)
            result[name] = dict(A=a / n, G=g / n, grad_by_hand=grad_w / n, grad=model_grad, T=T,
                                own_G=_g_from(own[name], n))
        elif isinstance(m, BN_TYPES):
            xin = inputs[name]
            group = getattr(m, "bn_batch", 0) or n
            xhat = torch.empty_like(xin)
            for start in range(0, n, group):
                for c in range(xin.shape[1]):
                    vals = xin[start:start + group, c]
                    mean = vals.sum() / vals.numel()
                    var = ((vals - mean) ** 2).sum() / vals.numel()
                    xhat[start:start + group, c] = (vals - mean) / math.sqrt(var.item() + m.eps)
            fisher = torch.zeros(xin.shape[1], 2, 2, dtype=torch.float64)
            for i in range(n):
                for c in range(xin.shape[1]):
                    d = own[name][i][c]
                    v = torch.stack([(d * xhat[i, c]).sum(), d.sum()])
                    fisher[c] += torch.outer(v, v)
            result[name] = dict(F=fisher / n, grad=torch.stack([m.weight.grad, m.bias.grad], -1),
                                xhat=xhat)
    return result


def _g_from(ds: list[torch.Tensor], n: int) -> torch.Tensor:
    rows = [output_rows(d) for d in ds]
    return sum(r.T @ r / r.shape[0] for r in rows) / n


def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec."""
    return m.T.reshape(-1)


def unvec(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return v.reshape(cols, rows).T


def dense_solve(a: torch.Tensor, g: torch.Tensor, grad: torch.Tensor, damping: float, mode: str) -> torch.Tensor:
    da, dg = a.shape[0], g.shape[0]
    if mode == "exact":
        big = torch.kron(a, g) + damping * torch.eye(da * dg, dtype=torch.float64)
    else:
        pi = math.sqrt((torch.trace(a).item() / da) / (torch.trace(g).item() / dg))
        root = math.sqrt(damping)
        big = torch.kron(a + pi * root * torch.eye(da, dtype=torch.float64),
                         g + root / pi * torch.eye(dg, dtype=torch.float64))
    return unvec(torch.linalg.solve(big, vec(grad)), dg, da)


def dense_bn_solve(fisher: torch.Tensor, pairs: torch.Tensor, damping: float) -> torch.Tensor:
    return torch.stack([torch.linalg.solve(fisher[c] + damping * torch.eye(2, dtype=torch.float64), pairs[c])
                        for c in range(fisher.shape[0])])


def current_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every K-FAC layer's gradient as the maths sees it: out × in(+1), or channels × 2 for BN."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            g = m.weight.grad.reshape(m.weight.shape[0], -1)
            out[name] = torch.cat([g, m.bias.grad[:, None]], 1) if m.bias is not None else g.clone()
        elif isinstance(m, BN_TYPES):
            out[name] = torch.stack([m.weight.grad, m.bias.grad], -1)
    return out


def dense_preconditioned(pre: KFACPreconditioner, grads: dict[str, torch.Tensor], damping: float,
                         mode: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, grad in grads.items():
        factors = pre.factors[name]
        if len(factors) == 2:
            out[name] = dense_solve(factors[0], factors[1], grad, damping, mode)
        else:
            out[name] = dense_bn_solve(factors[0], grad, damping)
    return out


# ----------------------------------------------------------------------------- 1. factors


@pytest.mark.parametrize("kind", ["mlp", "conv_bn", "conv_ghost", "bn_conv"])
def test_factors_equal_explicit_expectations(kind):
    model = make_model(kind)
    x, y = make_data(kind)
    ref = reference(model, x, y)
    pre = make_pre(model)
    assert pre.left_out == []
    kfac_step(pre, model, x, y)
    kron, bns = kronecker_modules(model), bn_modules(model)
    assert set(pre.factors) == {n for n, _ in kron} | {n for n, _ in bns}
    for name, m in kron:
        r = ref[name]
        # the hand-cut ā reproduce autograd's ∇W = 1/N Σ Ds āᵀ (checks the reference's patch layout)
        torch.testing.assert_close(r["grad_by_hand"], r["grad"], **TIGHT)
        a, g = pre.factors[name]
        torch.testing.assert_close(a, r["A"], **TIGHT, msg=lambda s: f"A of {kind}.{name}: {s}")
        torch.testing.assert_close(g, r["G"], **TIGHT, msg=lambda s: f"G of {kind}.{name}: {s}")
        if not upstream_of_bn(model, name):
            torch.testing.assert_close(g, r["own_G"], **TIGHT)
    for name, m in bns:
        (fisher,) = pre.factors[name]
        assert fisher.shape == (m.num_features, 2, 2)
        torch.testing.assert_close(fisher, ref[name]["F"], **TIGHT, msg=lambda s: f"F of {kind}.{name}: {s}")


def test_ghost_bn_fisher_uses_group_statistics():
    """With bn_batch=3 on N=6 the group-normalised x̂ differs from the whole-batch one, and the factor
    follows the group version (the whole-batch Fisher would be measurably different)."""
    model = make_model("conv_ghost")
    x, y = make_data("conv_ghost")
    ref = reference(model, x, y)
    pre = make_pre(model)
    kfac_step(pre, model, x, y)
    plain = make_model("conv_bn")
    plain.load_state_dict(model.state_dict())
    ref_plain = reference(plain, x, y)
    assert not torch.allclose(ref["1"]["xhat"], ref_plain["1"]["xhat"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(pre.factors["1"][0], ref["1"]["F"], **TIGHT)
    assert not torch.allclose(pre.factors["1"][0], ref_plain["1"]["F"], rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- 2./3. preconditioning


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("kind", ["mlp", "conv_bn", "bn_conv"])
def test_preconditioned_gradient_equals_dense_solve(kind, mode):
    model = make_model(kind)
    x, y = make_data(kind)
    damping = 3e-2
    pre = make_pre(model, damping=damping, damping_mode=mode)
    kfac_step(pre, model, x, y)
    before = current_grads(model)
    expected = dense_preconditioned(pre, before, damping, mode)
    pre.update_inverses()
    assert pre.damping_raised == []
    pre.precondition(lr=0.1)
    after = current_grads(model)
    for name in before:
        assert not torch.allclose(expected[name], before[name])  # the preconditioner does something
        torch.testing.assert_close(after[name], expected[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda s: f"{kind}.{name} ({mode}): {s}")
    assert pre.last_nu == 1.0


@pytest.mark.parametrize("kind", ["mlp", "conv_ghost"])
def test_eigen_and_cholesky_agree(kind):
    x, y = make_data(kind)
    results = {}
    for method in ("eigen", "cholesky"):
        model = make_model(kind)
        pre = make_pre(model, damping=1e-2, damping_mode="pi", inverse_method=method)
        kfac_step(pre, model, x, y)
        pre.update_inverses()
        pre.precondition(lr=0.1)
        results[method] = current_grads(model)
    for name in results["eigen"]:
        torch.testing.assert_close(results["cholesky"][name], results["eigen"][name], rtol=1e-10, atol=1e-12)


def test_cholesky_needs_pi_damping():
    a = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError):
        invert_kronecker(a, a, 1e-2, "cholesky", "exact", torch.float64)


# ----------------------------------------------------------------------------- 4. KL clipping


@pytest.mark.parametrize("ratio, expected_nu", [(0.25, 0.5), (4.0, 1.0)])
def test_kl_clip_scales_the_whole_update(ratio, expected_nu):
    kind, lr, damping = "conv_bn", 0.3, 1e-2
    x, y = make_data(kind)
    # the unclipped direction Δ by dense solves, and ν from it and the raw gradients
    probe = make_model(kind)
    probe_pre = make_pre(probe, damping=damping, damping_mode="pi")
    kfac_step(probe_pre, probe, x, y)
    grads = current_grads(probe)
    delta = dense_preconditioned(probe_pre, grads, damping, "pi")
    vg = lr ** 2 * sum((delta[k] * grads[k]).sum().item() for k in grads)
    assert vg > 0
    kl_clip = ratio * vg
    nu = min(1.0, math.sqrt(kl_clip / vg))
    assert nu == pytest.approx(expected_nu, rel=1e-12)

    model = make_model(kind)
    pre = make_pre(model, damping=damping, damping_mode="pi", kl_clip=kl_clip)
    kfac_step(pre, model, x, y)
    pre.update_inverses()
    pre.precondition(lr)
    after = current_grads(model)
    assert pre.last_nu == pytest.approx(nu, rel=1e-9)
    for name in grads:
        torch.testing.assert_close(after[name], nu * delta[name], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 5./6. accumulation, averaging


def test_gradient_accumulation_matches_one_batch():
    x, y = make_data("mlp")
    one = make_model("mlp")
    pre_one = make_pre(one)
    kfac_step(pre_one, one, x, y)

    acc = make_model("mlp")
    pre_acc = make_pre(acc)
    pre_acc.begin_step(0, grad_scale=3 * 2)
    for part in (slice(0, 3), slice(3, 6)):
        (F.cross_entropy(acc(x[part]), y[part]) / 2).backward()
    pre_acc.update_factors()
    for name in pre_one.factors:
        for got, want in zip(pre_acc.factors[name], pre_one.factors[name], strict=True):
            torch.testing.assert_close(got, want, **TIGHT)
    for p_acc, p_one in zip(acc.parameters(), one.parameters()):
        torch.testing.assert_close(p_acc.grad, p_one.grad, **TIGHT)


@pytest.mark.parametrize("kind", ["mlp", "conv_ghost"])
def test_running_average_of_factors(kind):
    decay = 0.7
    x1, y1 = make_data(kind, seed=1)
    x2, y2 = make_data(kind, seed=2)
    model = make_model(kind)
    ref1, ref2 = reference(model, x1, y1), reference(model, x2, y2)
    pre = make_pre(model, decay=decay)
    kfac_step(pre, model, x1, y1, step=0)
    kfac_step(pre, model, x2, y2, step=1)
    for name, m in kronecker_modules(model):
        a, g = pre.factors[name]
        torch.testing.assert_close(a, decay * ref1[name]["A"] + (1 - decay) * ref2[name]["A"], **TIGHT)
        torch.testing.assert_close(g, decay * ref1[name]["G"] + (1 - decay) * ref2[name]["G"], **TIGHT)
    for name, m in bn_modules(model):
        torch.testing.assert_close(pre.factors[name][0],
                                   decay * ref1[name]["F"] + (1 - decay) * ref2[name]["F"], **TIGHT)


# ----------------------------------------------------------------------------- 7. damping retry


def test_cholesky_retry_raises_the_damping():
    a = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64))
    g = torch.eye(3, dtype=torch.float64)
    given = 1e-2
    inverse = invert_kronecker(a, g, given, "cholesky", "pi", torch.float64)
    assert inverse.damping > given
    k = math.log10(inverse.damping / given)
    assert abs(k - round(k)) < 1e-9  # raised by powers of ten
    pi = math.sqrt((0.5 / 2) / (3.0 / 3))
    assert inverse.pi == pytest.approx(pi, rel=1e-12)
    root = math.sqrt(inverse.damping)
    shifted_a = a + pi * root * torch.eye(2, dtype=torch.float64)
    assert torch.linalg.eigvalsh(shifted_a).min() > 0
    torch.testing.assert_close(inverse.a, torch.linalg.inv(shifted_a), **TIGHT)
    torch.testing.assert_close(inverse.g, torch.linalg.inv(g + root / pi * torch.eye(3, dtype=torch.float64)),
                               **TIGHT)
    # the smallest power of ten that works: one tenth of it would not have made A + π√λ I definite
    assert pi * math.sqrt(inverse.damping / 10) <= 0.5


def test_cholesky_retry_gives_up_with_factor_error():
    a = torch.diag(torch.tensor([1.0, -1e12], dtype=torch.float64))
    g = torch.eye(2, dtype=torch.float64)
    with pytest.raises(FactorError):
        invert_kronecker(a, g, 1e-2, "cholesky", "pi", torch.float64)


# ----------------------------------------------------------------------------- 8. communication helpers


def _symmetric(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=g, dtype=torch.float64)
    return m + m.transpose(-1, -2)


def test_triangle_packing_round_trips():
    mats = [_symmetric(d, d, seed=d) for d in (1, 2, 3, 7)] + [_symmetric(4, 2, 2, seed=11)]
    flat = pack_triangles(mats)
    assert flat.dim() == 1
    assert flat.numel() == sum(d * (d + 1) // 2 for d in (1, 2, 3, 7)) + 4 * 3
    for d in (1, 2, 3, 7):
        assert pack_triangles([mats[[1, 2, 3, 7].index(d)]]).numel() == d * (d + 1) // 2
    back = unpack_triangles(flat, mats)
    assert len(back) == len(mats)
    for got, want in zip(back, mats):
        assert got.shape == want.shape
        assert torch.equal(got, want)
    # the packed numbers are exactly the upper triangles, in order
    d = 3
    m = mats[2]
    assert flat[1 + 3:1 + 3 + 6].tolist() == [m[i, j].item() for i in range(d) for j in range(i, d)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_assign_owners_balances_load(world_size):
    rnd = random.Random(world_size)
    for trial in range(20):
        costs = [rnd.uniform(0.1, 100.0) ** rnd.choice([1, 2, 3]) for _ in range(rnd.randint(0, 12))]
        owners = assign_owners(costs, world_size)
        assert len(owners) == len(costs)  # every item has exactly one owner
        assert all(isinstance(o, int) and 0 <= o < world_size for o in owners)
        loads = [0.0] * world_size
        for cost, owner in zip(costs, owners):
            loads[owner] += cost
        assert sum(loads) == pytest.approx(sum(costs))
        if costs:
            assert max(loads) <= sum(costs) / world_size + max(costs) + 1e-9


# ----------------------------------------------------------------------------- 9. schedule


def test_interval():
    assert [interval(s, (1, 5), (4,)) for s in range(8)] == [1, 1, 1, 1, 5, 5, 5, 5]
    assert [interval(s, (2, 10), (4,)) for s in (0, 3, 4, 100)] == [2, 2, 10, 10]
    assert [interval(s, (3,), ()) for s in (0, 7)] == [3, 3]
    assert [interval(s, (1, 2, 4), (3, 6)) for s in range(8)] == [1, 1, 1, 2, 2, 2, 4, 4]


def test_factor_and_inverse_due():
    model = make_model("mlp")
    pre = make_pre(model, factor_every=(1, 5), inverse_every=(2, 10), every_milestones=(4,))
    steps = range(26)
    # before step 4: factors every step, inverses every 2nd; from step 4 on, every 5th and every 10th step
    assert [s for s in steps if pre.factor_due(s)] == [0, 1, 2, 3, 4, 9, 14, 19, 24]  # counted from the milestone
    assert [s for s in steps if pre.inverse_due(s)] == [0, 2, 4, 14, 24]
    kfac_step(pre, model, *make_data("mlp"), step=0)  # factors exist from here on
    pre.begin_step(5, grad_scale=N)
    assert not pre.capturing
    pre.begin_step(9, grad_scale=N)
    assert pre.capturing


def test_a_run_whose_first_step_was_skipped_captures_on_its_next_step():
    """A non-finite loss skips step 0 before on_gradients; with factors due only every 10th step, step 1
    still captures, since there are no factors to precondition with yet."""
    pre = make_pre(make_model("mlp"), factor_every=(10,), inverse_every=(10,))
    pre.begin_step(0, grad_scale=N)
    assert pre.capturing  # and then the step is skipped: nothing is taken
    pre.begin_step(1, grad_scale=N)
    assert pre.capturing and not pre.factors


@pytest.mark.parametrize("shape", [(5, 18, 9), (5, 18, 4), (3, 7, 1)], ids=["batched", "one GEMM", "one position"])
def test_sum_of_outer_products_takes_either_path_to_the_explicit_sum(shape):
    """Both ways `_sum_outer` forms Σ_n Σ_t m[n, :, t] m[n, :, t]ᵀ (batched per example when positions are
    many, one GEMM over a copy when they are few) against the explicit double loop."""
    from largebatch.optim.kfac.layers import _sum_outer

    m = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    explicit = sum(torch.outer(m[n, :, t], m[n, :, t]) for n in range(shape[0]) for t in range(shape[2]))
    torch.testing.assert_close(_sum_outer(m), explicit, rtol=1e-12, atol=1e-12)
