"""The preference losses against values worked out by hand (mmtrain.training.preference)."""

import math

import pytest
import torch

from mmtrain.training.preference import preference_loss


def _t(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _pair(**kw):
    # policy: chosen -2, rejected -3; reference: -2.5 for both. Log-ratios +0.5 and -0.5, h = 1.
    policy_chosen, policy_rejected = _t(-2.0), _t(-3.0)
    out = preference_loss(policy_chosen, policy_rejected, torch.tensor([-2.5]), torch.tensor([-2.5]), beta=0.1, **kw)
    return out, policy_chosen, policy_rejected


def test_sigmoid_loss_rewards_margin_accuracy_and_gradient():
    out, chosen, rejected = _pair()
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.1)))  # -log sigmoid(0.1 * 1)
    assert out.rewards_chosen.item() == pytest.approx(0.05)
    assert out.rewards_rejected.item() == pytest.approx(-0.05)
    assert out.margin.item() == pytest.approx(0.1)
    assert out.accuracy.item() == 1.0
    out.loss.sum().backward()
    slope = 0.1 * (1 / (1 + math.exp(0.1)))  # beta * sigmoid(-beta * h)
    assert chosen.grad.item() == pytest.approx(-slope)
    assert rejected.grad.item() == pytest.approx(slope)


def test_ipo_loss_is_the_squared_distance_of_h_from_one_over_two_beta():
    out, _, _ = _pair(kind="ipo")
    assert out.loss.item() == pytest.approx((1.0 - 1 / 0.2) ** 2)  # 16
    assert out.margin.item() == pytest.approx(0.1)


def test_length_normalized_divides_each_log_ratio_by_its_answer_tokens():
    out, _, _ = _pair(kind="length_normalized", chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([4]))
    h = 0.5 / 2 - (-0.5 / 4)  # 0.375
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.1 * h)))
    assert out.rewards_chosen.item() == pytest.approx(0.1 * 0.25)
    assert out.rewards_rejected.item() == pytest.approx(-0.1 * 0.125)


def test_sft_term_adds_the_chosen_answers_per_token_nll():
    out, chosen, _ = _pair(sft_weight=0.5, chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([1]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.1)) + 0.5 * 2.0 / 4)
    out.loss.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)) - 0.5 / 4)


def test_a_tie_scores_half_and_a_loss_of_log_two():
    # The first step: the policy is its reference, every margin is 0.
    logps = torch.tensor([-1.0, -7.0, -3.0])
    out = preference_loss(logps, logps.flip(0), logps, logps.flip(0), beta=0.1)
    assert out.loss.tolist() == pytest.approx([math.log(2)] * 3)
    assert out.accuracy.tolist() == [0.5, 0.5, 0.5]
    sums = out.metric_sums()
    assert sums.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.5])


def test_a_wrong_ordering_scores_zero():
    out = preference_loss(torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=1.0)
    assert out.accuracy.item() == 0.0
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(1.0)))


def test_length_normalized_without_token_counts_is_refused():
    with pytest.raises(ValueError, match="token counts"):
        preference_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, kind="length_normalized")
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, kind="hinge")
