"""Token pooling and the contrastive task-embedding loss (arXiv 2603.12577, eqs. 7-8), against direct computations."""

import math

import torch

from pyramid_peft.contrastive import contrastive_module_names, pool_features, task_contrastive_loss, token_mean
from pyramid_peft.routing import TaskRoute


def test_token_mean_skips_padding_per_example_and_over_the_batch():
    x = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(token_mean(x, mask), torch.stack([x[0, :2].mean(0), x[1, 0]]))
    torch.testing.assert_close(token_mean(x, mask, per_example=False), (x[0, 0] + x[0, 1] + x[1, 0]) / 3)
    torch.testing.assert_close(token_mean(x, None), x.mean(1))
    rows = torch.randn(4, 2)
    assert torch.equal(token_mean(rows, None), rows)


def test_pool_features_first_position_or_masked_mean():
    x = torch.randn(2, 3, 4)
    route = TaskRoute(2, "EPT")
    torch.testing.assert_close(pool_features(x, "first", route), x[:, 0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with route.call(torch.tensor([0, 1]), mask):
        torch.testing.assert_close(pool_features(x, "mean", route), torch.stack([x[0, :2].mean(0), x[1].mean(0)]))


def test_contrastive_loss_is_cross_entropy_of_cosines_over_tau():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    table = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    cos = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]) / tau
    ids = torch.tensor([0, 1])
    expected = -(torch.log_softmax(cos, -1)[0, 0] + torch.log_softmax(cos, -1)[1, 1]) / 2
    torch.testing.assert_close(task_contrastive_loss(features, table, ids, tau), expected)


def test_contrastive_modules_are_the_encoders_where_there_is_one():
    names = ["encoder.block.0.q", "decoder.block.0.q", "lm_head"]
    assert contrastive_module_names(names, "encoder") == {"encoder.block.0.q"}
    assert contrastive_module_names(names, "all") == set(names)
    assert contrastive_module_names(["model.layers.0.q_proj"], "encoder") == {"model.layers.0.q_proj"}
