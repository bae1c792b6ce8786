"""OMCDA: allocation, the alpha_i solve, the influence chain rule, the V^c normalisation, heterogeneous influence on a
toy task, and smoke runs of the headline command and each ablation."""

import math
import re

import numpy as np
import pytest
import torch

import omcda
from common.datasets import Dataset
from conftest import run_script, smoke_run


def test_allocation_budgets_are_nonnegative_sum_to_d_tot_and_follow_influence():
    influence = torch.tensor([0.3, -2.0, 5.0, 1.0])
    random_split = torch.tensor([0.1, 0.2, 0.3, 0.4])
    budget = omcda.allocate_budget(influence, 1.2, "influence", 1.0, random_split)
    assert (budget >= 0).all() and math.isclose(budget.sum().item(), 1.2, rel_tol=1e-6)
    assert torch.equal(torch.argsort(budget), torch.argsort(influence))  # larger m_i -> larger d_i
    # Scale-free: multiplying every influence by the same positive factor leaves the split unchanged.
    torch.testing.assert_close(omcda.allocate_budget(1000 * influence, 1.2, "influence", 1.0, random_split), budget)
    # A lower temperature concentrates the budget on the most influential agent.
    sharper = omcda.allocate_budget(influence, 1.2, "influence", 0.1, random_split)
    assert sharper[2] > budget[2]
    torch.testing.assert_close(omcda.allocate_budget(influence, 1.2, "uniform", 1.0, random_split), torch.full((4,), 0.3))
    torch.testing.assert_close(omcda.allocate_budget(influence, 1.2, "random", 1.0, random_split), random_split * 1.2)
    with pytest.raises(ValueError, match="valid: influence, uniform, random"):
        omcda.allocate_budget(influence, 1.2, "greedy", 1.0, random_split)


def test_random_allocation_is_a_fixed_split_of_the_simplex():
    torch.manual_seed(3)
    agents = omcda.Agents(3, 4, 1, 2, omcda.Args(hidden_dim=8, mixer_hidden_dim=4))
    split = agents.random_allocation
    assert (split > 0).all() and math.isclose(split.sum().item(), 1.0, rel_tol=1e-6)
    assert not torch.allclose(split, torch.full((3,), 1 / 3), atol=1e-3)


def test_alpha_rises_above_budget_and_falls_below():
    log_alpha = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([log_alpha], lr=0.1)
    kl, budget = torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.3])  # agent 0 over budget, agent 1 under
    for _ in range(5):
        optimizer.zero_grad()
        omcda.alpha_loss(log_alpha, kl, budget).backward()
        optimizer.step()
    assert log_alpha[0] > 0.3 and log_alpha[1] < -0.3


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_std, ref_mean, ref_log_std = (torch.randn(3, 5, 2) for _ in range(4))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, log_std.exp()),
                                                 torch.distributions.Normal(ref_mean, ref_log_std.exp())).sum(-1)
    torch.testing.assert_close(omcda.gaussian_kl(mean, log_std, ref_mean, ref_log_std), expected)


def test_influence_matches_finite_difference_along_the_kl_gradient():
    """Move theta_i = (mean, log_std) by h * g_KL: Delta V^r_tot / Delta KL must equal the chain-rule m_i."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        n, batch, act_dim = 3, 64, 2
        q_reward = omcda.AgentQ(n, 4, act_dim, 16)
        obs = torch.randn(n, batch, 4)
        w_reward = torch.rand(n, batch) + 0.5
        mean, log_std = 0.3 * torch.randn(n, batch, act_dim), -0.5 + 0.1 * torch.randn(n, batch, act_dim)
        behaviour_mean, behaviour_log_std = torch.zeros(n, batch, act_dim), torch.full((n, batch, act_dim), -0.4)
        noise = torch.randn(n, batch, act_dim)
        m = omcda.influence(mean, log_std, behaviour_mean, behaviour_log_std, lambda a: q_reward(obs, a), w_reward, noise)

        def reward_value(mu, ls):
            return (w_reward * q_reward(obs, torch.tanh(mu + ls.exp() * noise))).sum(1)

        def kl(mu, ls):
            return omcda.gaussian_kl(mu, ls, behaviour_mean, behaviour_log_std).sum(1)

        theta = (mean.clone().requires_grad_(True), log_std.clone().requires_grad_(True))
        g_mean, g_log_std = torch.autograd.grad(kl(*theta).sum(), theta)
        h = 1e-5
        moved = (mean + h * g_mean, log_std + h * g_log_std)
        with torch.no_grad():
            finite_difference = (reward_value(*moved) - reward_value(mean, log_std)) / (kl(*moved) - kl(mean, log_std))
        torch.testing.assert_close(m, finite_difference, rtol=1e-3, atol=1e-6)
        assert m.abs().max() > 1e-3  # a non-trivial measurement
    finally:
        torch.set_default_dtype(torch.float32)


def test_conservative_value_normalises_the_local_policy():
    """With Q fixed on a discrete toy, the trained V^c_i makes E_{pi_b}[exp(z_i)] = 1 at every observation."""
    torch.manual_seed(0)
    n_obs, n_actions = 2, 4
    behaviour = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6]])
    z_without_v = torch.tensor([[[0.5, -1.0, 2.0, 0.0], [1.0, 0.3, -0.5, 1.5]],  # agent 0, per obs and action
                                [[-0.2, 0.4, 1.1, -2.0], [0.0, 0.0, 3.0, -1.0]]])  # agent 1
    counts = (behaviour * 40).long()
    obs_index = torch.cat([torch.full((int(c.sum()),), o) for o, c in enumerate(counts)])
    action_index = torch.cat([torch.repeat_interleave(torch.arange(n_actions), c) for c in counts])
    obs = torch.eye(n_obs)[obs_index].expand(2, -1, -1)
    targets = z_without_v[:, obs_index, action_index]
    v_conservative = omcda.AgentValue(2, n_obs, 32)
    optimizer = torch.optim.Adam(v_conservative.parameters(), lr=1e-2)
    for _ in range(1500):
        optimizer.zero_grad()
        omcda.conservative_value_loss(v_conservative(obs), targets).backward()
        optimizer.step()
    with torch.no_grad():
        v = v_conservative(torch.eye(n_obs).expand(2, -1, -1))  # [agent, obs]
    normaliser = (behaviour * torch.exp(z_without_v - v[..., None])).sum(-1)
    torch.testing.assert_close(normaliser, torch.ones(2, n_obs), atol=2e-2, rtol=0)


def heterogeneous_dataset(n_samples: int = 3000, seed: int = 0):
    """r = -(a_0 - 0.6)^2 - 0.05 (a_1 + 0.6)^2: agent 0 drives the reward, agent 1 barely does.
    One step, behaviour a_i ~ clip(N(0, 0.5^2))."""
    rng = np.random.default_rng(seed)
    best, scale = np.array([0.6, -0.6], np.float32), np.array([1.0, 0.05], np.float32)
    actions = np.clip(rng.normal(0.0, 0.5, (n_samples, 2, 1)), -0.99, 0.99).astype(np.float32)
    rewards = -(scale * (actions[..., 0] - best) ** 2).sum(-1)
    obs, states = np.ones((n_samples, 2, 1), np.float32), np.ones((n_samples, 1), np.float32)
    arrays = dict(observations=obs, next_observations=obs, states=states, next_states=states, actions=actions,
                  rewards=rewards.astype(np.float32), terminals=np.ones(n_samples, bool), timeouts=np.zeros(n_samples, bool))
    return Dataset(arrays, dict(obs_mode="local"), "local", "cpu"), best, scale


def train_on_heterogeneous_task(allocation: str, steps: int = 900):
    torch.manual_seed(0)
    dataset, best, scale = heterogeneous_dataset()
    args = omcda.Args(allocation=allocation, d_tot=0.5, hidden_dim=64, mixer_hidden_dim=16, q_lr=3e-3, v_lr=3e-3,
                      policy_lr=3e-3, alpha_init=1.0, alpha_min=0.1, alpha_lr=1e-2, bc_steps=300, bc_lr=3e-3)
    agents = omcda.Agents(2, dataset.obs_dim, 1, 1, args)
    optimizers = omcda.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    omcda.pretrain_behaviour(agents, dataset, args, generator)
    for _ in range(steps):
        omcda.update(agents, optimizers, dataset.sample(128, generator), args)
    with torch.no_grad():
        action = agents.policy.act(dataset.obs[:, :1]).squeeze().numpy()
    return agents.budget.clone(), float(-(scale * (action - best) ** 2).sum())


def test_influential_agent_gets_the_larger_budget_and_no_worse_return():
    budget, omcda_return = train_on_heterogeneous_task("influence")
    uniform_budget, uniform_return = train_on_heterogeneous_task("uniform")
    print(f"influence budgets {budget.tolist()} return {omcda_return:.4f}; uniform return {uniform_return:.4f}")
    assert math.isclose(budget.sum().item(), 0.5, rel_tol=1e-5)
    assert budget[0] > 1.5 * budget[1]
    torch.testing.assert_close(uniform_budget, torch.tensor([0.25, 0.25]))
    # BC returns about -0.37 here; both allocations learn, and influence is at least as good as uniform.
    assert uniform_return > -0.1
    assert omcda_return >= uniform_return - 0.005


SMOKE_FLAGS = ("--no-generate", "--eval-episodes", "1", "--final-eval-episodes", "1", "--bc-steps", "20")


def test_headline_command_smoke(tiny_hopper_dir, tmp_path):
    run = smoke_run("omcda.py", tiny_hopper_dir, tmp_path, "--env", "Hopper", "--dataset", "medium-replay", "--d-tot",
                    "1.2", "--bc-steps", "20", total_steps=40)
    assert re.search(r"step 20: eval return .*\| alpha \[.*\]  budget \[.*\]  kl \[.*\]  influence \[.*\]", run.stdout)
    assert run.args["d_tot"] == 1.2
    assert {"alpha", "v_conservative", "q_conservative"} <= set(run.checkpoint["optimizers"])
    assert "log_alpha" in run.checkpoint["agents"] and "budget" in run.checkpoint["agents"]
    assert {f"agents/{name}_{i}" for name in ("alpha", "budget", "influence", "kl") for i in range(3)} <= run.scalars


@pytest.mark.parametrize("ablation", [("--allocation", "uniform"), ("--allocation", "random"), ("--no-decouple",)])
def test_ablation_flags_smoke(tiny_hopper_dir, tmp_path, ablation):
    result = run_script("omcda.py", "--data-dir", str(tiny_hopper_dir), *SMOKE_FLAGS, "--total-steps", "10",
                        "--eval-every", "100", "--log-every", "5", *ablation, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final return:" in result.stdout


def test_unknown_allocation_is_a_clear_error(tiny_hopper_dir, tmp_path):
    result = run_script("omcda.py", "--data-dir", str(tiny_hopper_dir), "--no-generate", "--allocation", "greedy",
                        cwd=tmp_path)
    assert result.returncode != 0
    assert "invalid choice 'greedy'" in result.stderr and "'influence', 'uniform', 'random'" in result.stderr


def test_conservative_mixer_rows_are_convex_combinations():
    torch.manual_seed(0)
    mixer = omcda.ConservativeMixer(state_dim=5, n_agents=3, hidden_dim=8)
    w, b = mixer(torch.randn(7, 5))
    assert w.shape == (3, 3, 7) and b.shape == (3, 7) and (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(3, 7), atol=1e-5, rtol=0)
    values = torch.randn(3, 7)
    mixed = omcda.mix_conservative(w, values, torch.zeros(3, 7))
    assert (mixed <= values.max(0).values + 1e-5).all() and (mixed >= values.min(0).values - 1e-5).all()
