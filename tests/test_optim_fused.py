"""The fused CPU kernels of LARS and LAMB (impl="fused", largebatch.optim.fused) against the foreach path.

The foreach path is itself checked against float64 per-parameter references in test_lars_lamb.py; here
every option combination of both optimizers runs a few steps under changing lrs (0 included) on a
set of tensors chosen to reach the kernels' corners: sizes 1, 7 and odd, one large enough to split
between two threads, all-zero weights and all-zero gradients (trust ratio 1), a parameter without a
gradient, a channels-last weight, a gradient with other strides than its weight. In float64 the fused
step must give the foreach step's numbers to rounding (1e-12); in float32 those of the float64 and
of the float32 foreach steps to 1e-6. Two threads, and chunks from a few elements to the whole group,
are checked on one configuration of each. The kernels are compiled once for the module into a
temporary cache directory.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from largebatch import api, load_config
from largebatch.errors import ConfigError
from largebatch.optim import fused
from largebatch.optim.fused import build
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from test_lars_lamb import LAMB_CASES, LAMB_LRS, LARS_CASES, LRS, assert_same_params, ref_lamb, ref_lars, run_opt

LR_STEPS = [0.5, 1.0, 0.0, 2.0, 0.3]  # lr 0 included: larc_clip's trust / lr has its own rule there
SHAPES = {"one": (1,), "seven": (7,), "odd": (3, 5, 7), "conv": (16, 8, 3, 3), "zero_w": (33,), "zero_g": (65,),
          "no_grad": (10,), "large": (70_001,)}  # large: the kernel uses two threads from 65,536 elements on
F64 = 1e-12
F32 = 1e-6


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    """The kernels compiled into a fresh cache directory, once for this module; the list of compilations."""
    try:
        build.compiler()
    except build.KernelBuildError as e:
        pytest.skip(f"the fused kernels cannot be built here: {e}")
    compilations = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(build.CACHE_ENV, str(tmp_path_factory.mktemp("kernel_cache")))
        compile_library = build.compile_library
        mp.setattr(build, "compile_library", lambda *args: compilations.append(args) or compile_library(*args))
        build.library()
        yield compilations


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class Setup:
    """An optimizer to run: how to build it over groups, the trusted group's weight decay, the lrs."""

    make: Callable[[list[dict]], torch.optim.Optimizer]
    weight_decay: float
    lrs: list[float]
    ratio_key: str  # the state entry with the per-tensor factor


def lars(impl: str, options: dict) -> Setup:
    options = dict(options)
    weight_decay = options.pop("weight_decay")
    return Setup(lambda gs: LARS(gs, lr=LR_STEPS[0], trust_coefficient=0.02, impl=impl, **options), weight_decay,
                 LR_STEPS, "local_lr")


def lamb(impl: str, options: dict) -> Setup:
    options = dict(options)
    weight_decay = options.pop("weight_decay")
    return Setup(lambda gs: LAMB(gs, lr=LR_STEPS[0], impl=impl, **options), weight_decay,
                 [lr * 1e-2 for lr in LR_STEPS], "trust_ratio")


def named(params: list[torch.Tensor], name: str) -> torch.Tensor:
    return params[list(SHAPES).index(name)]


def make_params(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for name, shape in SHAPES.items():
        p = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        if name == "zero_w":
            p.zero_()
        if name == "conv":
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(p.requires_grad_())
    return params


def set_grads(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for name, p in zip(SHAPES, params):
        g = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)  # contiguous: "conv" differs
        if name == "zero_g":
            g.zero_()
        if name == "odd":  # other strides than the weight's: the kernel gets a copy laid out as the weight
            g = g.transpose(0, 2).contiguous().transpose(0, 2)
        p.grad = None if name == "no_grad" else g


def groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    """A trusted group with weight decay, and "seven" in an untrusted one without (as param_groups(model,
    wd, exclude_bn_bias=True) makes for a BN parameter)."""
    return [dict(params=[p for p in params if p is not named(params, "seven")], weight_decay=weight_decay),
            dict(params=[named(params, "seven")], weight_decay=0.0, trust=False)]


def train(params: list[torch.Tensor], opt: torch.optim.Optimizer, lrs: list[float], steps: range) -> None:
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        set_grads(params, step)
        opt.step()


def run(setup: Setup, dtype: torch.dtype, weight_decay: float | None = None,
        steps: int = len(LR_STEPS)) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = make_params(dtype)
    opt = setup.make(groups(params, setup.weight_decay if weight_decay is None else weight_decay))
    train(params, opt, setup.lrs, range(steps))
    return params, opt


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """actual == expected to `rel` of each element and of the tensor's largest element (an element
    near 0 carries the rounding of the larger ones it was computed from)."""
    expected = expected.detach().to(actual.dtype)
    atol = rel * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach(), expected, rtol=rel, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_run(fast, reference, setup: Setup, rel: float) -> None:
    """The parameters and every state entry of two runs agree to `rel`; the parameter without a
    gradient was left alone and the untrusted group's ratio is 1."""
    (params, opt), (ref_params, ref_opt) = fast, reference
    for name, p, q in zip(SHAPES, params, ref_params):
        assert_close_to(p, q, rel, name)
        if name == "no_grad":
            assert p not in opt.state and torch.equal(p.detach(), named(make_params(p.dtype), name).detach())
            continue
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in opt.state[p].items():
            expected = ref_opt.state[q][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == p.dtype and value.shape == expected.shape
                assert_close_to(value, expected, rel, f"{name} {key}")
            else:
                assert value == expected
    assert float(opt.state[named(params, "seven")][setup.ratio_key]) == 1.0  # the untrusted group's


def assert_fused_is_foreach(options: dict, setup: Callable[[str, dict], Setup]) -> None:
    fast, reference = setup("fused", options), setup("foreach", options)
    assert_same_run(run(fast, torch.float64), run(reference, torch.float64), fast, F64)
    fast32 = run(fast, torch.float32)
    assert_same_run(fast32, run(reference, torch.float64), fast, F32)
    assert_same_run(fast32, run(reference, torch.float32), fast, F32)


# ---------------------------------------------------------------------------------------------- the maths

LARS_OPTIONS = [dict(mode=mode, momentum=momentum, nesterov=nesterov, eps=eps, weight_decay=weight_decay)
                for mode in ("lars", "larc_clip", "larc_scale")
                for momentum, nesterov in ((0.9, False), (0.9, True), (0.0, False))
                for eps in (0.0, 1e-3) for weight_decay in (0.0, 1e-2)]
LAMB_OPTIONS = [dict(betas=betas, eps=eps, bias_correction=bias_correction, trust_clip=trust_clip,
                     weight_decay=weight_decay)
                for betas in ((0.9, 0.999), (0.5, 0.9)) for eps in (1e-6, 1e-3) for bias_correction in (True, False)
                for trust_clip in (None, 1.0) for weight_decay in (0.0, 1e-2)]


def options_id(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("options", LARS_OPTIONS, ids=options_id)
def test_fused_lars_matches_foreach(options):
    assert_fused_is_foreach(options, lars)


@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=options_id)
def test_fused_lamb_matches_foreach(options):
    assert_fused_is_foreach(options, lamb)


@pytest.mark.parametrize("chunk", [None, 64, 4096, 1 << 40], ids=["default", "tiny_chunks", "chunks", "one_chunk"])
def test_two_threads_and_any_chunking_give_the_same_step(chunk, two_threads, monkeypatch):
    """Two threads that split each chunk between them, over chunks of part of a tensor, of a few
    tensors, or of the whole group: the same step as the foreach path."""
    if chunk is not None:
        monkeypatch.setattr(fused, "CHUNK", chunk)
    assert_fused_is_foreach(LARS_OPTIONS[3], lars)
    assert_fused_is_foreach(LAMB_OPTIONS[-1], lamb)


@pytest.mark.parametrize("case", LARS_CASES, ids=options_id)
def test_fused_lars_matches_the_float64_reference(case):
    net, _ = run_opt(lambda gs: LARS(gs, lr=LRS[0], momentum=0.9, weight_decay=case["wd"],
                                     trust_coefficient=case.get("eta", 0.02), nesterov=case["nesterov"],
                                     mode=case["mode"], impl="fused"),
                     exclude=case["exclude"], wd=case["wd"], lrs=LRS)
    assert_same_params(net, ref_lars(lrs=LRS, **case))


@pytest.mark.parametrize("case", LAMB_CASES, ids=options_id)
def test_fused_lamb_matches_the_float64_reference(case):
    net, _ = run_opt(lambda gs: LAMB(gs, lr=LAMB_LRS[0], weight_decay=case["wd"], trust_clip=case["trust_clip"],
                                     bias_correction=case.get("bias_correction", True), impl="fused"),
                     exclude=case["exclude"], wd=case["wd"], lrs=LAMB_LRS)
    assert_same_params(net, ref_lamb(lrs=LAMB_LRS, **case))


def test_zero_norms_give_ratio_one():
    """All-zero weights, and all-zero gradients (LAMB without weight decay: a zero update), take the
    fallback ratio 1; the others do not."""
    for setup in (lars("fused", LARS_OPTIONS[0]), lamb("fused", LAMB_OPTIONS[0])):
        params, opt = run(setup, torch.float32, weight_decay=0.0, steps=1)
        for name in ("zero_w", "zero_g"):
            assert float(opt.state[named(params, name)][setup.ratio_key]) == 1.0
        assert float(opt.state[named(params, "one")][setup.ratio_key]) != 1.0


@pytest.mark.parametrize("setup", [lambda impl: lars(impl, LARS_OPTIONS[3]), lambda impl: lamb(impl, LAMB_OPTIONS[-1])],
                         ids=["lars", "lamb"])
@pytest.mark.parametrize("first, second", [("fused", "foreach"), ("foreach", "fused")])
def test_state_dict_resumes_under_the_other_impl(setup, first, second):
    """Half the steps with one impl, its state_dict loaded into an optimizer of the other, the rest
    there: the same as all the steps with the first impl."""
    whole, _ = run(setup(first), torch.float64)
    params = make_params(torch.float64)
    opt = setup(first).make(groups(params, 1e-2))
    train(params, opt, setup(first).lrs, range(2))
    resumed = setup(second).make(groups(params, 0.5))  # the loaded groups' options replace these
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(params, resumed, setup(second).lrs, range(2, len(LR_STEPS)))
    for name, p, q in zip(SHAPES, params, whole):
        assert_close_to(p, q, F64, name)


def test_the_step_bumps_the_parameters_versions():
    """Autograd sees the kernel's in-place writes, as it sees those of torch's ops."""
    params, opt = run(lars("fused", LARS_OPTIONS[0]), torch.float32, steps=1)
    before = [p._version for p in params]
    set_grads(params, 1)
    opt.step()
    assert all(p._version > v for name, p, v in zip(SHAPES, params, before) if name != "no_grad")


# ---------------------------------------------------------------------------------------------- building

def test_compiled_once_into_the_cache_directory(kernel_cache, tmp_path, monkeypatch):
    """One compilation for the whole module, into $LARGEBATCH_CACHE_DIR; a later optimizer, or a
    process that finds the library on disk, compiles nothing; another directory compiles anew."""
    run(lars("fused", LARS_OPTIONS[0]), torch.float32, steps=1)
    run(lamb("fused", LAMB_OPTIONS[0]), torch.float32, steps=1)
    assert len(kernel_cache) == 1
    compiled_into = kernel_cache[0][1]
    assert compiled_into.parent == build.cache_dir() and compiled_into.is_file()
    build.load.cache_clear()  # as in a new process
    build.library()
    assert len(kernel_cache) == 1
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    LARS([torch.zeros(3, requires_grad=True)], lr=0.1, impl="fused")
    assert len(kernel_cache) == 2 and kernel_cache[1][1].parent == tmp_path / "kernels"
    assert [f.name for f in (tmp_path / "kernels").iterdir()] == [kernel_cache[1][1].name]  # no temporary left


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_refused_when_built(cls, tmp_path, monkeypatch):
    """impl values other than the three, parameters the kernels cannot update and a machine without a
    compiler are refused when the optimizer is built, naming impl and what to choose instead."""
    with pytest.raises(ValueError, match="impl = 'fast' is not allowed; choose one of 'foreach', 'compiled', 'fused'"):
        cls([torch.zeros(3, requires_grad=True)], lr=0.1, impl="fast")
    for p in (torch.zeros(3, dtype=torch.bfloat16, requires_grad=True),
              torch.zeros(3, device="meta", requires_grad=True)):
        with pytest.raises(ValueError, match="impl = 'fused' is not allowed for a parameter of .*; choose 'foreach', "
                                             "'compiled'"):
            cls([p], lr=0.1, impl="fused")
        cls([p], lr=0.1, impl="foreach")
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ValueError, match="impl = 'fused' is not available: the C\\+\\+ compiler .* does not run"):
        cls([torch.zeros(3, requires_grad=True)], lr=0.1, impl="fused")


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_refused_at_the_step(cls):
    """What can change after the optimizer is built: a group that mixes dtypes, a parameter whose
    elements are not contiguous in any order."""
    mixed = [torch.ones(3, requires_grad=True), torch.ones(3, dtype=torch.float64, requires_grad=True)]
    strided = [torch.ones(4, 6)[:, ::2].requires_grad_()]
    for params, match in ((mixed, "float64 on cpu next to torch.float32"), (strided, "strides \\(6, 2\\)")):
        opt = cls(params, lr=0.1, impl="fused")
        for p in params:
            p.grad = torch.ones_like(p)
        with pytest.raises(ValueError, match=f"impl = 'fused': .*{match}"):
            opt.step()


def test_config_refuses_fused_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("lars", "lamb"):
        cfg = load_config("fmnist_goyal", {"optim.name": name, f"optim.{name}.impl": "fused", "dist.device": "cuda"})
        with pytest.raises(ConfigError, match=f"optim.{name}.impl = 'fused' is a CPU kernel"):
            api.check_device(cfg)
        api.check_device(load_config("fmnist_goyal", {"optim.name": name, "dist.device": "cuda"}))


# ---------------------------------------------------------------------------------------------- the benchmark

def test_bench_optim_prints_and_writes_every_row(tmp_path, monkeypatch, capsys):
    """`largebatch bench optim` on a small model: the table and the JSON hold every row, with the ratios
    to the two baselines. The compiled rows run their update uncompiled here (compiling takes minutes)."""
    import json

    from largebatch.cli import main
    from largebatch.optim import lamb as lamb_module, lars as lars_module

    for module in (lars_module, lamb_module):
        monkeypatch.setattr(module, "compiled", lambda update: update)
    out = tmp_path / "optim.json"
    assert main(["bench", "optim", "--model", "small_cnn", "--steps", "2", "--json", str(out)]) == 0
    names = ["SGD(fused)", "AdamW(fused)", "SGD(foreach)", "AdamW(foreach)", "largebatch MomentumSGD",
             "LARS foreach", "LARS compiled", "LARS fused", "LAMB foreach", "LAMB compiled", "LAMB fused",
             "per-parameter loop LARS"]
    try:
        import timm.optim  # noqa: F401
        names += ["timm Lars", "timm Lamb"]
    except ImportError:
        pass
    printed = capsys.readouterr().out
    assert all(f"\n{name} " in printed for name in names)
    record = json.loads(out.read_text())
    assert record["benchmark"] == "bench_optim" and record["machine"]["torch"] == torch.__version__
    assert (record["model"], record["device"], record["steps"]) == ("small_cnn", "cpu", 2)
    rows = {row["name"]: row for row in record["rows"]}
    assert list(rows) == names and all(row["median_ms"] > 0 for row in rows.values())
    assert rows["SGD(fused)"]["x_sgd_fused"] == 1.0 and rows["AdamW(fused)"]["x_adamw_fused"] == 1.0
    assert rows["LAMB fused"]["x_adamw_fused"] > 0 and rows["LARS fused"]["x_adamw_fused"] is None
