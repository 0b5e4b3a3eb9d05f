"""The torch.compile path of LARS and LAMB (one fused expression per tensor) against the same float64
per-parameter references as the eager foreach path, and proof that it really ran compiled."""

import pytest
import torch

from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from test_lars_lamb import LAMB_LRS, LRS, assert_same_params, ref_lamb, ref_lars, run_opt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("case", [
    dict(exclude=True, wd=1e-2, nesterov=True, mode="lars"),
    dict(exclude=False, wd=5e-3, nesterov=False, mode="larc_clip", eta=0.1),
], ids=["lars-nesterov-excluded", "larc_clip"])
def test_compiled_lars_matches_reference(case):
    net, opt = run_opt(lambda gs: LARS(gs, lr=LRS[0], momentum=0.9, weight_decay=case["wd"],
                                       trust_coefficient=case.get("eta", 0.02), nesterov=case["nesterov"],
                                       mode=case["mode"], impl="compiled"),
                       exclude=case["exclude"], wd=case["wd"], lrs=LRS)
    assert compiled_graphs() == len(opt.param_groups)  # one graph per group, none recompiled for a new lr
    assert_same_params(net, ref_lars(lrs=LRS, **case))
    eager, eager_opt = run_opt(lambda gs: LARS(gs, lr=LRS[0], momentum=0.9, weight_decay=case["wd"],
                                               trust_coefficient=case.get("eta", 0.02), nesterov=case["nesterov"],
                                               mode=case["mode"]),
                               exclude=case["exclude"], wd=case["wd"], lrs=LRS)
    for p, q in zip(opt.param_groups[0]["params"], eager_opt.param_groups[0]["params"]):
        torch.testing.assert_close(opt.state[p]["local_lr"], eager_opt.state[q]["local_lr"], rtol=1e-10, atol=0)


@pytest.mark.parametrize("case", [
    dict(exclude=True, wd=1e-2, trust_clip=None),
    dict(exclude=False, wd=1e-2, trust_clip=1.0),
], ids=["excluded", "clipped"])
def test_compiled_lamb_matches_reference(case):
    net, opt = run_opt(lambda gs: LAMB(gs, lr=LAMB_LRS[0], weight_decay=case["wd"], trust_clip=case["trust_clip"],
                                       impl="compiled"),
                       exclude=case["exclude"], wd=case["wd"], lrs=LAMB_LRS)
    assert compiled_graphs() == len(opt.param_groups)  # new lr and bias corrections did not recompile
    assert_same_params(net, ref_lamb(lrs=LAMB_LRS, **case))
