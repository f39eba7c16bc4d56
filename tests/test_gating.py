"""Gates: top-k softmax, the public EPT double softmax and the Switch balance loss, against hand-computed values."""

import math

import torch

from pyramid_peft.gating import reference_double_softmax, switch_balance_loss, topk_softmax


def test_topk_softmax_renormalises_the_chosen_logits_and_zeros_the_rest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    e3, e2 = math.exp(3.0), math.exp(2.0)
    expected = torch.tensor([[0.0, e3 / (e3 + e2), e2 / (e3 + e2), 0.0]])
    torch.testing.assert_close(topk_softmax(logits, 2), expected)
    first = 1.0 / (1.0 + math.exp(-0.5))  # tau = 2: the chosen logits are (3 - 2) / 2 apart
    torch.testing.assert_close(topk_softmax(logits, 2, tau=2.0), torch.tensor([[0.0, first, 1.0 - first, 0.0]]))


def test_topk_softmax_with_every_expert_is_the_dense_softmax():
    logits = torch.randn(5, 4)
    torch.testing.assert_close(topk_softmax(logits, 4, tau=0.5), torch.softmax(logits / 0.5, -1))


def test_double_softmax_applies_softmax_to_the_top_probabilities():
    logits = torch.tensor([0.0, 2.0, 1.0])
    p = torch.softmax(logits, -1)
    top = torch.softmax(torch.stack([p[1], p[2]]), -1)
    torch.testing.assert_close(reference_double_softmax(logits, 2), torch.stack([torch.tensor(0.0), top[0], top[1]]))
    assert reference_double_softmax(logits, 2)[1] < topk_softmax(logits, 2)[1]  # flatter than one softmax


def test_switch_balance_loss_is_one_when_uniform_and_grows_with_imbalance():
    uniform_logits = torch.zeros(4, 2)
    balanced = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(switch_balance_loss(uniform_logits, balanced), torch.tensor(1.0))
    skewed_logits = torch.tensor([[2.0, 0.0]] * 4)
    all_first = torch.tensor([[1.0, 0.0]] * 4)
    p_first = math.exp(2.0) / (math.exp(2.0) + 1.0)
    torch.testing.assert_close(switch_balance_loss(skewed_logits, all_first), torch.tensor(2 * p_first))
