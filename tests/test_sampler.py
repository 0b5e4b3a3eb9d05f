"""The global-shuffle sampler and the exact evaluation shards."""

import pytest
import torch

from largebatch.config import DataConfig, plan_batches
from largebatch.data.sampler import EvalBatchSampler, GlobalBatchSampler, epoch_permutation, eval_shard


def _rank_batches(n, global_batch, world, micro, epoch, seed=3):
    plan = plan_batches(DataConfig(global_batch=global_batch, micro_batch=micro, bn_batch=0), world)
    out = []
    for rank in range(world):
        s = GlobalBatchSampler(n, plan, rank, seed)
        s.set_epoch(epoch)
        out.append(list(s))
    return plan, out


def test_ranks_are_disjoint_and_cover_all_full_global_batches():
    n, g, world = 1003, 96, 3
    plan, per_rank = _rank_batches(n, g, world, micro=16, epoch=0)
    seen = [i for batches in per_rank for b in batches for i in b]
    steps = n // g
    assert len(seen) == len(set(seen)) == steps * g  # remainder dropped, nothing twice
    assert all(len(b) == plan.micro_batch for batches in per_rank for b in batches)
    assert all(len(batches) == steps * plan.accum_steps for batches in per_rank)


def test_same_global_permutation_on_every_rank_sliced_contiguously():
    n, g, world = 500, 60, 3
    plan, per_rank = _rank_batches(n, g, world, micro=10, epoch=4)
    order = epoch_permutation(n, 3, 4).tolist()
    for step in range(n // g):
        rebuilt = []
        for rank in range(world):
            rebuilt += sum(per_rank[rank][step * plan.accum_steps:(step + 1) * plan.accum_steps], [])
        assert rebuilt == order[step * g:(step + 1) * g]


def test_single_process_sees_the_same_step_batches_as_k_workers():
    _, multi = _rank_batches(400, 40, 4, micro=5, epoch=1)
    _, single = _rank_batches(400, 40, 1, micro=40, epoch=1)
    per_step_multi = [sum((sum(multi[r][s * 2:(s + 1) * 2], []) for r in range(4)), []) for s in range(10)]
    assert per_step_multi == single[0]


def test_deterministic_per_epoch_and_different_across_epochs():
    _, a = _rank_batches(300, 30, 2, micro=15, epoch=2)
    _, b = _rank_batches(300, 30, 2, micro=15, epoch=2)
    _, c = _rank_batches(300, 30, 2, micro=15, epoch=3)
    assert a == b and a != c


def test_resume_mid_epoch_continues_the_same_sequence():
    plan = plan_batches(DataConfig(global_batch=20, bn_batch=0), 1)
    s = GlobalBatchSampler(200, plan, 0, seed=1)
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, start_step=4)
    assert list(s) == full[4:] and len(s) == 6
    t = GlobalBatchSampler(200, plan, 0, seed=99)
    t.load_state_dict(s.state_dict())
    assert list(t) == full[4:]


def test_too_small_dataset_is_a_clear_error():
    plan = plan_batches(DataConfig(global_batch=512, bn_batch=0), 1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(100, plan, 0, 0)


@pytest.mark.parametrize("n, world", [(10, 3), (7, 4), (3, 4), (10000, 3), (1, 2)])
def test_eval_shards_count_every_sample_exactly_once(n, world):
    shards = [list(eval_shard(n, r, world)) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))
    batches = [b for r in range(world) for b in EvalBatchSampler(n, 3, r, world)]
    assert sorted(sum(batches, [])) == list(range(n))


def test_permutation_is_a_permutation():
    p = epoch_permutation(1000, 0, 0)
    assert torch.equal(p.sort().values, torch.arange(1000))
