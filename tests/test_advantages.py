import torch

from dash_core.advantages import gradient_filter, group_advantages


def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 4.0, 6.0]])
    adv = group_advantages(rewards, scale_std=True)
    # group 0: mean 0.25, unbiased std sqrt(0.25) = 0.5
    assert torch.allclose(adv[0], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.equal(adv[1], torch.zeros(4))
    # group 2: mean 3, unbiased std sqrt(20/3)
    std = (20 / 3) ** 0.5
    assert torch.allclose(adv[2], torch.tensor([-3 / std, -1 / std, 1 / std, 3 / std]))


def test_advantages_without_std_scaling_are_centred_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 4.0, 6.0]])
    adv = group_advantages(rewards, scale_std=False)
    assert torch.allclose(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25], [-3.0, -1.0, 1.0, 3.0]]))


def test_all_equal_group_gets_zero_advantage_not_nan():
    adv = group_advantages(torch.ones(2, 8))
    assert torch.equal(adv, torch.zeros(2, 8))


def test_gradient_filter_drops_small_advantages():
    adv = torch.tensor([0.0, 0.05, -0.05, 0.1, -0.2, 1.5])
    assert gradient_filter(adv, tau=0.1).tolist() == [False, False, False, True, True, True]


def test_tau_zero_keeps_everything():
    adv = torch.tensor([[0.0, 0.0], [0.3, -0.3]])
    assert gradient_filter(adv, tau=0.0).all()


def test_with_binary_rewards_filter_drops_exactly_the_uniform_groups():
    rewards = torch.tensor([[1.0] * 8, [0.0] * 8, [1.0] + [0.0] * 7])
    kept = gradient_filter(group_advantages(rewards), tau=0.1)
    assert kept.tolist() == [[False] * 8, [False] * 8, [True] * 8]
