"""Task sampling (docs/pipeline.md): probabilities, empirical proportions, ranks, passes and exact resume."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from pyramid_peft.data import MultiTaskBatchSampler, task_probabilities

SIZES = [100, 400, 1500]
STRATEGIES = ["uniform", "proportional", "temperature", "exp"]
GLUE_TRAIN_SIZES = [8551, 392702, 3668, 104743, 363846, 2490, 67349, 5749]  # cola mnli mrpc qnli qqp rte sst2 stsb


def test_probabilities_by_hand():
    assert task_probabilities(SIZES, "uniform") == pytest.approx([1 / 3] * 3)
    assert task_probabilities(SIZES, "proportional") == pytest.approx([0.05, 0.2, 0.75])
    tempered = [0.05**0.5, 0.2**0.5, 0.75**0.5]
    assert task_probabilities(SIZES, "temperature", 2.0) == pytest.approx([w / sum(tempered) for w in tempered])
    exps = [math.exp(0.05), math.exp(0.2), math.exp(0.75)]
    assert task_probabilities(SIZES, "exp") == pytest.approx([w / sum(exps) for w in exps])


def test_exp_strategy_reproduces_the_spec_table():
    expected = [0.1098, 0.1646, 0.1092, 0.1215, 0.1596, 0.1091, 0.1168, 0.1095]
    assert task_probabilities(GLUE_TRAIN_SIZES, "exp").round(4).tolist() == expected


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(sizes=[], strategy="uniform"), "non-empty"),
        (dict(sizes=[3, 0], strategy="uniform"), "positive"),
        (dict(sizes=[3], strategy="balanced"), "choose one of: uniform, proportional, temperature, exp"),
        (dict(sizes=[3], strategy="temperature", temperature=0), "temperature must be positive"),
    ],
)
def test_probability_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        task_probabilities(**bad)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("homogeneous", [True, False])
def test_empirical_task_proportions_match(strategy, homogeneous):
    sampler = MultiTaskBatchSampler(
        SIZES, batch_size=4, strategy=strategy, temperature=2.0, homogeneous=homogeneous, seed=3
    )
    counts = Counter(task for batch in sampler.batches(3000) for task, _ in batch)
    empirical = np.array([counts[task] for task in range(len(SIZES))]) / sum(counts.values())
    # 3000 task draws (12000 when mixed): a standard error below 0.01 for every task.
    assert empirical == pytest.approx(task_probabilities(SIZES, strategy, 2.0), abs=0.03)


def test_homogeneous_batches_hold_one_task_and_valid_indices():
    sampler = MultiTaskBatchSampler(SIZES, batch_size=8, strategy="uniform")
    for batch in sampler.batches(200):
        assert len(batch) == 8 and len({task for task, _ in batch}) == 1
        assert all(0 <= example < SIZES[task] for task, example in batch)


def test_mixed_batches_mix_tasks():
    batches = MultiTaskBatchSampler(SIZES, batch_size=16, homogeneous=False).batches(20)
    assert any(len({task for task, _ in batch}) > 1 for batch in batches)


@pytest.mark.parametrize("homogeneous", [True, False])
def test_ranks_share_tasks_and_split_examples(homogeneous):
    ranks = [
        MultiTaskBatchSampler(SIZES, batch_size=4, homogeneous=homogeneous, seed=5, rank=rank, world_size=2)
        for rank in (0, 1)
    ]
    single = MultiTaskBatchSampler(SIZES, batch_size=8, homogeneous=homogeneous, seed=5)
    for batch0, batch1, global_batch in zip(ranks[0].batches(50), ranks[1].batches(50), single.batches(50)):
        if homogeneous:
            assert {task for task, _ in batch0} == {task for task, _ in batch1}
        assert not set(batch0) & set(batch1)
        assert batch0 + batch1 == global_batch  # the ranks together see what one process with 2x batch sees


def test_every_pass_visits_each_example_once_in_a_new_order():
    sampler = MultiTaskBatchSampler([10], batch_size=5, seed=1)
    first_pass, second_pass = sampler.batches(2), sampler.batches(2)
    first = [example for batch in first_pass for _, example in batch]
    second = [example for batch in second_pass for _, example in batch]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second and first != list(range(10))


def test_drop_last_discards_a_partial_tail_and_wrap_keeps_it():
    dropped = MultiTaskBatchSampler([10], batch_size=4, drop_last=True).batches(3)
    # Two full batches use 8 of the 10; the third starts a fresh pass instead of mixing passes.
    assert len({example for batch in dropped[:2] for _, example in batch}) == 8
    wrapped = MultiTaskBatchSampler([10], batch_size=4, drop_last=False).batches(5)
    examples = [example for batch in wrapped for _, example in batch]
    assert sorted(examples[:10]) == list(range(10))


def test_drop_last_refuses_tasks_smaller_than_a_global_batch():
    with pytest.raises(ValueError, match=r"Tasks \[0\] have fewer examples than one global batch \(8\)"):
        MultiTaskBatchSampler([5, 100], batch_size=4, world_size=2)
    assert len(MultiTaskBatchSampler([5, 100], batch_size=4, world_size=2, drop_last=False).batches(1)[0]) == 4


@pytest.mark.parametrize("homogeneous", [True, False])
def test_resume_continues_with_the_same_batches(homogeneous):
    settings = dict(task_sizes=SIZES, batch_size=6, strategy="temperature", homogeneous=homogeneous, seed=11)
    original = MultiTaskBatchSampler(**settings)
    original.batches(1500)  # crosses a block of task draws and several passes over the small task
    state = original.state_dict()
    resumed = MultiTaskBatchSampler(**settings)
    resumed.load_state_dict(state)
    assert resumed.batches(40) == original.batches(40)
    assert resumed.state_dict() == original.state_dict()


def test_resume_from_a_bare_step_matches_and_other_ranks_can_load_it():
    rank0 = MultiTaskBatchSampler(SIZES, batch_size=3, world_size=2, rank=0)
    rank0.batches(700)
    rank1 = MultiTaskBatchSampler(SIZES, batch_size=3, world_size=2, rank=1)
    rank1.load_state_dict(rank0.state_dict())
    fresh1 = MultiTaskBatchSampler(SIZES, batch_size=3, world_size=2, rank=1)
    fresh1.batches(700)
    assert rank1.batches(20) == fresh1.batches(20)
    bare = MultiTaskBatchSampler(SIZES, batch_size=3, world_size=2, rank=0)
    bare.load_state_dict({"step": 700})
    assert bare.batches(20) == rank0.batches(20)


def test_resume_with_different_settings_is_refused():
    state = MultiTaskBatchSampler(SIZES, batch_size=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="different settings {'seed': 1}"):
        MultiTaskBatchSampler(SIZES, batch_size=4, seed=2).load_state_dict(state)


def test_works_as_a_dataloader_batch_sampler_with_flat_indices():
    datasets = [torch.utils.data.TensorDataset(torch.arange(size) + 1000 * task) for task, size in enumerate(SIZES)]
    concatenated = torch.utils.data.ConcatDataset(datasets)
    sampler = MultiTaskBatchSampler(SIZES, batch_size=4, seed=2)
    expected = MultiTaskBatchSampler(SIZES, batch_size=4, seed=2).batches(3)

    class FlatIndices:
        def __iter__(self):
            for batch in sampler:
                yield [sampler.flat_index(task, example) for task, example in batch]

    loader = torch.utils.data.DataLoader(concatenated, batch_sampler=FlatIndices())
    for (values,), batch in zip(loader, expected):
        assert values.tolist() == [1000 * task + example for task, example in batch]
    assert sampler.offsets == (0, 100, 500)


def test_task_weights_multiply_the_strategy_and_are_checked():
    assert task_probabilities([10, 10], "uniform", task_weights=[1, 3]).tolist() == pytest.approx([0.25, 0.75])
    assert task_probabilities([30, 10], "proportional", task_weights=[1, 3]).tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="Task weights must be 2 positive numbers"):
        task_probabilities([10, 10], "uniform", task_weights=[1, 0])
    sampler = MultiTaskBatchSampler([50, 50], batch_size=1, weights=[1, 3], seed=3)
    drawn = [batch[0][0] for batch in sampler.batches(4000)]
    assert drawn.count(1) / len(drawn) == pytest.approx(0.75, abs=0.03)
    assert sampler.state_dict()["weights"] == [1.0, 3.0]
