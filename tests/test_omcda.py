"""OMCDA: allocation, the alpha_i solve, the per-state soft value against enumeration and quadrature (and against the
exp loss's upward bias), the influence and KL estimators against enumeration, the values of a multi-step chain against their closed form, allocation on a task where one agent matters,
smoke runs of the headline command and each ablation, and benchmarks/omcda_diagnose.py on the smoke run's
checkpoint."""

import copy
import math
import re
import sys

import numpy as np
import pytest
import torch

import omcda
from common.datasets import Dataset
from conftest import (CHAIN_GAMMA, CHAIN_JOINT, CHAIN_REWARD, REPO, assert_polyak_step, chain_dataset,
                      chain_joint_batch, chain_soft_optimum, perturb_, random_batch, run_script, smoke_run)

sys.path.insert(0, str(REPO / "benchmarks"))
import omcda_diagnose  # noqa: E402


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


def placeholder_batch(obs: torch.Tensor, avail: torch.Tensor | None = None) -> omcda.NoisyBatch:
    """A batch whose only meaningful fields are obs [1, n, B, obs_dim] and avail (what the soft value target reads)."""
    seeds, n_agents, size, _ = obs.shape
    agent, joint = torch.zeros(seeds, n_agents, size, 1), torch.zeros(seeds, size)
    return omcda.NoisyBatch(obs=obs, actions=agent, rewards=joint, next_obs=obs, dones=joint, states=joint[..., None],
                            next_states=joint[..., None], avail=avail, next_avail=avail)


def test_value_targets_are_the_behaviour_policys_log_mean_exp_and_the_tilts_mean():
    """V̂_i = log E_{pi_b,i}[exp(s_i Q̄_i)] / s_i and V̂^r_i = E_{pi_b,i}[exp(s_i Q̄_i) Q̄^r_i] / E_{pi_b,i}[exp(s_i Q̄_i)]:
    on one-hot actions the sums over the available ones, weighted by pi_b,i; on continuous actions, with 16,384 actions
    of pi_b,i, the tanh-Gaussian integrals by quadrature."""
    torch.manual_seed(0)
    args = omcda.Args(hidden_dim=16, mixer_hidden_dim=8)
    obs, scale = torch.randn(1, 2, 5, 3), 0.5 + torch.rand(1, 2, 5)

    agents = omcda.Agents(2, 3, 4, 4, args, discrete=True)
    avail = torch.rand(1, 2, 5, 4) < 0.6
    avail[..., 0] = True
    with torch.no_grad():
        probs = agents.behaviour.log_probs(obs, avail).exp()
        q, q_reward = (torch.stack([critic(obs, one_hot.expand(1, 2, 5, 4)) for one_hot in torch.eye(4)], -1)
                       for critic in (agents.q_target, agents.q_reward_target))
        v_soft, v_reward = omcda.value_targets(agents, placeholder_batch(obs, avail), scale)
    tilt = probs * torch.exp(scale[..., None] * q)
    torch.testing.assert_close(v_soft, torch.log(tilt.sum(-1)) / scale)
    torch.testing.assert_close(v_reward, (tilt * q_reward).sum(-1) / tilt.sum(-1))

    agents = omcda.Agents(2, 3, 1, 4, args)
    with torch.no_grad():
        agents.q_target.net[-1].weight.mul_(40.0)  # values that vary over the actions, so that the tilt shows
        agents.q_reward_target.net[-1].weight.mul_(10.0)
        batch = omcda.add_behaviour_noise(placeholder_batch(obs), 16384, [torch.Generator().manual_seed(0)])
        v_soft, v_reward = omcda.value_targets(agents, batch, scale)
        mean, log_std = agents.behaviour(obs)  # [1, 2, 5, 1]
        u = mean + log_std.exp() * torch.linspace(-8, 8, 2001)  # [1, 2, 5, 2001] on the pre-tanh axis
        density = torch.exp(-0.5 * ((u - mean) / log_std.exp()) ** 2) / (log_std.exp() * math.sqrt(2 * math.pi))
        q, q_reward = (critic(obs.unsqueeze(-2).expand(-1, -1, -1, 2001, -1).flatten(2, 3),
                              torch.tanh(u).flatten(2, 3)[..., None]).unflatten(-1, (5, 2001))
                       for critic in (agents.q_target, agents.q_reward_target))
        tilt = density * torch.exp(scale[..., None] * q)
        integral = torch.trapezoid(tilt, u)
    torch.testing.assert_close(v_soft, torch.log(integral) / scale, atol=0.01, rtol=0)
    torch.testing.assert_close(v_reward, torch.trapezoid(tilt * q_reward, u) / integral, atol=0.01, rtol=0)
    # Measured errors 0.004 (V̂) and 0.002 (V̂^r) against 0.01; the tilt matters: the plain mean of Q̄^r under pi_b is
    # 0.05 away from V̂^r.
    assert (v_reward - torch.trapezoid(density * q_reward, u)).abs().max() > 0.02


class StateBlindValue(torch.nn.Module):
    """One V_i per agent whatever o_i: a value that cannot tell the states apart."""

    def __init__(self, n_agents: int):
        super().__init__()
        self.value = torch.nn.Parameter(torch.zeros(n_agents, 1))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value.expand(*obs.shape[:-1])


def test_a_value_blind_to_the_state_fits_the_mean_of_the_states_soft_values():
    """The mechanism of the collapse at d_tot 1.2 on Hopper (docs/omcda.md): OMIGA's exp loss fits V_i, over states it
    cannot tell apart, to a soft maximum of their values, and the backups compound the excess. On the chain with V_i
    blind to the state and Q̄_i, the mixer and alpha_i frozen, the per-state soft values V̂_i(o) spread over several
    units: L_V must settle V_i at their mean over the data, as squared error does (the exp loss settles 3.5 above)."""
    torch.manual_seed(0)
    dataset = chain_dataset(discrete=True)
    args, agents, optimizers, _ = chain_agents(dataset)
    with torch.no_grad():
        agents.q.net[-1].weight.mul_(80.0)
        agents.q_target.load_state_dict(agents.q.state_dict())
    optimizers["q"].param_groups[0]["lr"] = 0.0
    agents.v, agents.v_target = StateBlindValue(2), StateBlindValue(2)
    optimizers["v"] = torch.optim.Adam(agents.v.parameters(), lr=0.05)
    batch = dataset.gather(torch.arange(len(dataset)))
    for _ in range(400):
        omcda.update(agents, optimizers, batch, args)
    with torch.no_grad():
        w, _ = agents.mixer_target(batch.states)
        scale = w / torch.tensor(CHAIN_ALPHA, dtype=torch.float32)[:, None]
        probs = agents.behaviour.log_probs(batch.obs, batch.avail).exp()
        q = torch.stack([agents.q_target(batch.obs, one_hot.expand_as(batch.actions)) for one_hot in torch.eye(2)], -1)
        soft_values = torch.log((probs * torch.exp(scale[..., None] * q)).sum(-1)) / scale  # [n, rows]
    assert (soft_values.amax(-1) - soft_values.amin(-1)).min() > 2.0
    torch.testing.assert_close(agents.v.value.detach().flatten(), soft_values.mean(-1), atol=0.05, rtol=0)


def tilted_policy(alpha, q_reward, q_conservative, w_reward, behaviour, sharpness=None):
    """pi_i(beta_i) ∝ pi_b,i exp(beta_i z_i), z_i = w^r_i Q^r_i / alpha_i + Q^c_i up to a per-state constant, at every
    state: [n, S, A]. beta_i = 1 (default) is pi*_i in Prop. 3.2's form, whose exponent the script's soft z_i equals,
    with y_i = Q^c_i - V^c_i its conservative part."""
    sharpness = torch.ones_like(alpha) if sharpness is None else sharpness
    exponent = w_reward[..., None] * q_reward / alpha[:, None, None] + q_conservative
    return torch.softmax(torch.log(behaviour) + sharpness[:, None, None] * exponent, -1)


def enumerated_toy(with_conservative: bool = True):
    """Two agents, three equally likely states, three actions: tables of Q^r_i, Q^c_i, w^r_i and pi_b,i."""
    generator = torch.Generator().manual_seed(0)
    q_reward = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    q_conservative = 0.7 * torch.randn(2, 3, 3, generator=generator, dtype=torch.float64) * with_conservative
    w_reward = 0.5 + torch.rand(2, 3, generator=generator, dtype=torch.float64)
    behaviour = torch.tensor([[[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]],
                              [[0.4, 0.4, 0.2], [0.3, 0.3, 0.4], [0.7, 0.2, 0.1]]], dtype=torch.float64)
    return q_reward, q_conservative, w_reward, behaviour, torch.tensor([0.7, 2.5], dtype=torch.float64)


def in_sample_parts(alpha, q_reward, q_conservative, w_reward, behaviour):
    """The data as the script sees it: every (s, a_i) repeated 10 pi_b,i(a_i | s) times, with the exact V^r_i (the
    fixed point of L_Vr), normaliser (that of L_V) and K_i(s) (that of L_K); returns the reward part x, z and K [n, N]."""
    pi = tilted_policy(alpha, q_reward, q_conservative, w_reward, behaviour)
    v_reward = (pi * q_reward).sum(-1, keepdim=True)
    x = w_reward[..., None] * (q_reward - v_reward) / alpha[:, None, None]
    normaliser = torch.log((behaviour * torch.exp(x + q_conservative)).sum(-1, keepdim=True))
    z = x + q_conservative - normaliser
    state_kl = (pi * z).sum(-1, keepdim=True).expand_as(z)
    counts = (10 * behaviour).round().long()
    return (torch.stack([torch.repeat_interleave(t[i].flatten(), counts[i].flatten()) for i in range(2)])
            for t in (x, z, state_kl))


def exact_reward_value_and_kl(alpha, q_reward, q_conservative, w_reward, behaviour, sharpness):
    """Per agent: E_s[w^r_i V^r_i] under pi_i(beta_i) and E_s[KL(pi_i(beta_i) || pi_b,i)], enumerated: [n], [n]."""
    pi = tilted_policy(alpha, q_reward, q_conservative, w_reward, behaviour, sharpness)
    reward_value = (w_reward * (pi * q_reward).sum(-1)).mean(-1)
    kl = (pi * torch.log(pi / behaviour)).sum(-1).mean(-1)
    return reward_value, kl


@pytest.mark.parametrize("with_conservative", [True, False])
def test_influence_and_kl_estimators_match_exact_enumeration(with_conservative):
    """m_i from the in-sample moments equals dV^r_tot/dKL_i by finite differences along pi_i(beta_i); the in-sample KL
    equals the enumerated KL(pi*_i || pi_b,i); without a conservative part m_i = alpha_i (envelope theorem)."""
    toy = enumerated_toy(with_conservative)
    alpha = toy[-1]
    x, z, state_kl = in_sample_parts(alpha, *toy[:-1])
    measured = omcda.influence_from_moments(alpha, omcda.influence_moments(x, z, state_kl))
    h = 1e-5
    finite_difference = torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[i] = h
        value_up, kl_up = exact_reward_value_and_kl(alpha, *toy[:-1], 1 + step)
        value_down, kl_down = exact_reward_value_and_kl(alpha, *toy[:-1], 1 - step)
        finite_difference[i] = (value_up[i] - value_down[i]) / (kl_up[i] - kl_down[i])
    torch.testing.assert_close(measured, finite_difference, rtol=1e-5, atol=0)
    _, exact_kl = exact_reward_value_and_kl(alpha, *toy[:-1], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(omcda.in_sample_kl(z), exact_kl, rtol=1e-9, atol=1e-12)
    # An offset in V (z shifted by a constant) does not move the estimate, and it is never negative.
    torch.testing.assert_close(omcda.in_sample_kl(z + 3.0), exact_kl, rtol=1e-9, atol=1e-12)
    assert (omcda.in_sample_kl(z - 3.0) >= 0).all()
    if with_conservative:  # the conservative part really moves the measurement away from the price alpha_i
        assert ((measured - alpha).abs() > 0.05 * alpha).all(), measured
    else:
        torch.testing.assert_close(measured, alpha)


def test_state_kl_loss_minimiser_is_the_conditional_kl():
    """L_K's minimiser over a free K per state is E_{pi*}[z | s] = KL(pi*(.|s) || pi_b(.|s)) on the enumerated toy."""
    toy = enumerated_toy()
    _, z, state_kl = in_sample_parts(toy[-1], *toy[:-1])
    states = torch.stack([torch.repeat_interleave(torch.arange(3).repeat_interleave(3), (10 * toy[3][i]).round().long().flatten())
                          for i in range(2)])
    free = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([free], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = omcda.state_kl_loss(free.gather(1, states), z, z_clip=10.0)
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(free.detach().gather(1, states), state_kl, rtol=0, atol=1e-6)


CHAIN_ALPHA = np.array([0.5, 2.0])


def chain_exact_values() -> dict:
    """pi*_i of r_i - alpha_i KL on the chain (conftest): its soft Q_i, V_i, then Q^r_i, V^r_i of pi*_i by linear solves."""
    exact = {}
    for i in range(2):
        q_soft, v_soft, pi = chain_soft_optimum(i, CHAIN_ALPHA[i])
        v_reward = np.linalg.solve(np.eye(2) - CHAIN_GAMMA * pi, (pi * CHAIN_REWARD[i]).sum(1))
        exact[i] = dict(q_soft=q_soft, v_soft=v_soft, v_reward=v_reward,
                        q_reward=CHAIN_REWARD[i] + CHAIN_GAMMA * v_reward[None, :])
    return exact


def chain_agents(dataset: Dataset) -> tuple[omcda.Args, omcda.Agents, dict, torch.Generator]:
    """OMCDA's networks for the chain, alpha_i held at CHAIN_ALPHA, pi_b cloned; their optimizers and the sampling
    generator."""
    args = omcda.Args(gamma=CHAIN_GAMMA, tau=0.05, hidden_dim=64, mixer_hidden_dim=32, q_lr=2e-3, v_lr=2e-3,
                      alpha_lr=0.0, alpha_min=0.1, alpha_max=10.0, bc_steps=1500, bc_lr=3e-3)
    agents = omcda.Agents(2, dataset.obs_dim, 2 if dataset.discrete else 1, 4, args, discrete=dataset.discrete)
    with torch.no_grad():
        agents.log_alpha.copy_(torch.tensor(np.log(CHAIN_ALPHA), dtype=torch.float32))
    optimizers = omcda.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    omcda.pretrain_behaviour(agents, dataset, args, generator)
    return args, agents, optimizers, generator


def test_values_match_the_closed_form_on_a_multi_step_chain():
    """gamma 0.8, no terminals, alpha = (0.5, 2) held fixed: the trained soft Q_tot, V_tot and the reward values
    Q^r_tot, V^r_tot equal those of pi*, so bootstrapping, both backups, the KL payment, alpha_i inside z_i and the
    weights of L_Vr all count."""
    torch.manual_seed(0)
    dataset = chain_dataset(discrete=True)  # one-hot actions: V̂_i sums over them exactly
    args, agents, optimizers, generator = chain_agents(dataset)
    batch = chain_joint_batch(dataset)

    def values() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            w, b = agents.mixer(batch.states)
            w_reward, b_reward = agents.mixer_reward(batch.states)
            return dict(q_soft=omcda.mix(w, agents.q(batch.obs, batch.actions), b),
                        v_soft=omcda.mix(w, agents.v(batch.obs), b)[..., ::4],
                        q_reward=omcda.mix(w_reward, agents.q_reward(batch.obs, batch.actions), b_reward),
                        v_reward=omcda.mix(w_reward, agents.v_reward(batch.obs), b_reward)[..., ::4])

    # Iterates averaged over the last 1,000 updates: at lr 2e-3 a single iterate still moves by about 0.05.
    snapshots = []
    for step in range(1, 3001):
        omcda.update(agents, optimizers, dataset.sample(128, generator), args)
        if step > 2000 and step % 100 == 0:
            snapshots.append(values())
    learned = {name: torch.stack([snapshot[name] for snapshot in snapshots]).mean(0).squeeze(0) for name in snapshots[0]}
    exact = chain_exact_values()
    local = CHAIN_JOINT
    expected = {name: [exact[0][name][s0, a0] + exact[1][name][s1, a1] for s0, s1, a0, a1 in local]
                for name in ("q_soft", "q_reward")}
    expected.update({name: [exact[0][name][s0] + exact[1][name][s1] for s0, s1, _, _ in local[::4]]
                     for name in ("v_soft", "v_reward")})
    for name, value in expected.items():
        torch.testing.assert_close(learned[name], torch.tensor(value, dtype=torch.float32), atol=0.08, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # Agent 0's discounted KL is far from zero, so the soft and reward values differ: the KL payment is tested.
    assert (exact[0]["v_reward"] - exact[0]["v_soft"]).min() > 0.5


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
        omcda.update(agents, optimizers, omcda.sample_batch(dataset, 128, args.behaviour_samples, generator), args)
    with torch.no_grad():
        action = agents.policy.act(dataset.obs[:, :1]).squeeze().numpy()
    return agents.budget[0].clone(), float(-(scale * (action - best) ** 2).sum())


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


def test_a_terminal_transition_backs_up_nothing():
    """On the chain with every transition out of joint state (1, 1) terminal, the soft Q_tot and the reward Q^r_tot
    there are the reward alone, while the next states' values are far from 0 (a backup without (1 - done) in either
    chain would add gamma V(s') to it)."""
    torch.manual_seed(0)
    dataset = chain_dataset(terminal_state=3, discrete=True)
    args, agents, optimizers, generator = chain_agents(dataset)
    for _ in range(2000):
        omcda.update(agents, optimizers, dataset.sample(128, generator), args)
    batch = chain_joint_batch(dataset)
    terminal = batch.dones.bool()
    with torch.no_grad():
        w, b = agents.mixer(batch.states)
        w_reward, b_reward = agents.mixer_reward(batch.states)
        q_tot = omcda.mix(w, agents.q(batch.obs, batch.actions), b)
        q_reward_tot = omcda.mix(w_reward, agents.q_reward(batch.obs, batch.actions), b_reward)
        next_w, next_b = agents.mixer(batch.next_states)
        next_w_reward, next_b_reward = agents.mixer_reward(batch.next_states)
        next_v_tot = omcda.mix(next_w, agents.v(batch.next_obs), next_b)
        next_v_reward_tot = omcda.mix(next_w_reward, agents.v_reward(batch.next_obs), next_b_reward)
    assert terminal.sum() == 4
    torch.testing.assert_close(q_tot[terminal], batch.rewards[terminal], atol=0.1, rtol=0)
    torch.testing.assert_close(q_reward_tot[terminal], batch.rewards[terminal], atol=0.1, rtol=0)
    # what a missing (1 - done) would add in each chain
    assert (CHAIN_GAMMA * torch.stack([next_v_tot, next_v_reward_tot])[:, terminal]).abs().amax(-1).min() > 0.5


def test_headline_command_smoke(tiny_hopper_dir, tmp_path):
    run = smoke_run("omcda.py", tiny_hopper_dir, tmp_path, "--env", "Hopper", "--dataset", "medium-replay", "--d-tot",
                    "1.2", "--bc-steps", "20", total_steps=40)
    assert re.search(r"step 20: eval return .*\| alpha \[.*\]  budget \[.*\]  kl \[.*\]  influence \[.*\]", run.stdout)
    assert run.args["d_tot"] == 1.2
    assert {"alpha", "v", "q", "v_reward", "q_reward"} <= set(run.checkpoint["optimizers"])
    assert "log_alpha" in run.checkpoint["agents"] and "budget" in run.checkpoint["agents"]
    assert {f"agents/{name}_{i}" for name in ("alpha", "budget", "influence", "kl") for i in range(3)} <= run.scalars


def diagnose(model, data_dir, capsys) -> tuple[list[list[str]], list[list[str]]]:
    """omcda_diagnose's two tables (team rows, agent rows) for one checkpoint, as lists of cells."""
    omcda_diagnose.main([str(model), "--data-dir", str(data_dir), "--samples", "256", "--kl-states", "32",
                         "--action-samples", "4", "--batch-size", "64", "--episodes", "1", "--swaps"])
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| checkpoint", "| step", "| ---"))]
    return [row for row in rows if row[0].endswith(".pt")], [row for row in rows if not row[0].endswith(".pt")]


def test_diagnosis_of_a_checkpoint_sees_pi_against_pi_b(tiny_hopper_dir, tmp_path, capsys):
    run = smoke_run("omcda.py", tiny_hopper_dir, tmp_path, "--bc-steps", "20", total_steps=20)
    (team,), agents = diagnose(run.run_dir / "model.pt", tiny_hopper_dir, capsys)
    assert len(agents) == 3 and all(0 < float(row[5]) <= 1 for row in agents)  # the ess of the policy weights
    assert max(float(row[8]) for row in agents) > 1e-3  # pi moved away from pi_b in 20 updates
    assert team[3] != team[5]  # and acts differently: the returns of pi and pi_b
    checkpoint = torch.load(run.run_dir / "model.pt", weights_only=False)
    for name in [key for key in checkpoint["agents"] if key.startswith("behaviour.")]:
        checkpoint["agents"]["policy." + name[len("behaviour."):]] = checkpoint["agents"][name].clone()
    copied = tmp_path / "pi_is_pi_b.pt"
    torch.save(checkpoint, copied)
    (team,), agents = diagnose(copied, tiny_hopper_dir, capsys)
    assert all(row[8] == "0.000" and row[9] == "0.000" for row in agents)  # kl_pi on the data and visited states
    _, z_pi, z_b = zip(*(row[11].split(" / ") for row in agents))
    assert z_pi == z_b
    pi_return, _, pi_b_return = team[3:6]
    assert pi_return == pi_b_return
    swapped = [float(side) for pair in team[-1].split(" ; ") for side in pair.split(" / ")]  # printed to 0 decimals
    assert len(swapped) == 6 and all(abs(side - float(pi_b_return)) <= 0.5 for side in swapped)


@pytest.mark.parametrize("ablation", [("--allocation", "uniform"), ("--allocation", "random"), ("--no-decouple",)])
def test_ablation_flags_smoke(tiny_hopper_dir, tmp_path, ablation):
    result = run_script("omcda.py", "--data-dir", str(tiny_hopper_dir), *SMOKE_FLAGS, "--total-steps", "10",
                        "--eval-every", "100", "--log-every", "5", *ablation, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final return:" in result.stdout


def test_decomposition_monitor_warns_when_the_soft_chain_rises_above_the_reward_chain():
    """Q_tot - Q^r_tot is at most 0 for exact critics: no warning at or below 5 % of |Q^r_tot| above it, one when a
    seed first exceeds it, none while the excess stays under twice the last warned one, and the seeds apart."""
    monitor = omcda.DecompositionMonitor()

    def values(gap, reward=200.0):
        return {"values/q_conservative_tot": gap, "values/q_reward_tot": reward}

    assert monitor.check(values(-30.0), 1, 1000) is None and monitor.check(values(10.0), 1, 2000) is None
    warning = monitor.check(values(12.0), 1, 3000)
    assert warning.startswith("warning: seed 1, update 3000: Q_tot - Q^r_tot = 12.0 is 6% of |Q^r_tot| above 0")
    assert monitor.check(values(23.0), 1, 4000) is None  # 11.5 % < 2 x 6 %
    assert "24.0 is 12%" in monitor.check(values(24.0), 1, 5000)
    assert monitor.check(values(12.0), 2, 5000) is not None  # another seed warns on its own
    assert monitor.check({"values/q_soft_tot": 1.0}, 1, 6000) is None  # --no-decouple logs no reward chain


def test_unknown_allocation_is_a_clear_error(tiny_hopper_dir, tmp_path):
    result = run_script("omcda.py", "--data-dir", str(tiny_hopper_dir), "--no-generate", "--allocation", "greedy",
                        cwd=tmp_path)
    assert result.returncode != 0
    assert "invalid choice 'greedy'" in result.stderr and "'influence', 'uniform', 'random'" in result.stderr


def noisy(batch, seed: int = 0) -> omcda.NoisyBatch:
    """A continuous batch with the noise of 8 behaviour actions per transition."""
    return omcda.add_behaviour_noise(batch, 8, torch.Generator().manual_seed(seed))


def small_agents(obs_dim: int = 3, state_dim: int = 4, **overrides) -> tuple[omcda.Args, omcda.Agents]:
    """Two agents with one action dim each, the input sizes of random_batch unless given."""
    torch.manual_seed(0)
    args = omcda.Args(hidden_dim=16, mixer_hidden_dim=8, **overrides)
    return args, omcda.Agents(2, obs_dim, 1, state_dim, args)


@pytest.mark.parametrize("online, unchanged, moved", [
    ("v", ["losses/q_soft", "losses/q_reward"], "losses/v_soft"),  # the backups read V̄ and V̄^r at s'
    ("v_reward", ["losses/q_soft", "losses/q_reward", "losses/v_soft", "losses/policy"], "losses/v_reward"),
    ("mixer", ["losses/v_soft", "losses/v_reward", "losses/policy", "agents/influence"], "losses/q_soft"),  # z: w̄
    ("q", ["losses/v_soft", "losses/v_reward", "losses/policy", "agents/influence"], "losses/q_soft"),  # z: Q̄
    ("mixer_reward", ["losses/v_reward", "agents/influence"], "losses/q_reward"),  # the reward part reads w̄^r
    ("q_reward", ["losses/v_reward", "agents/influence"], "losses/q_reward"),  # ... and Q̄^r
])
def test_losses_read_the_target_networks_where_the_maths_has_them(online, unchanged, moved):
    """Perturbing an online network before one update leaves every quantity whose inputs are target networks
    unchanged: one that read the online network instead would move."""
    args, base = small_agents(alpha_init=1.0)
    perturbed = copy.deepcopy(base)
    perturb_(getattr(perturbed, online))
    batch = noisy(random_batch())
    expected = omcda.update(base, omcda.make_optimizers(base, args), batch, args)
    got = omcda.update(perturbed, omcda.make_optimizers(perturbed, args), batch, args)
    for name in unchanged:
        torch.testing.assert_close(got[name], expected[name], msg=lambda m: f"{name}: {m}")
    assert not torch.allclose(got[moved], expected[moved])  # the perturbation itself shows


def test_targets_are_polyak_averages_of_the_online_networks():
    args, agents = small_agents(tau=0.3)
    pairs = {"v_target": "v", "q_target": "q", "mixer_target": "mixer", "v_reward_target": "v_reward",
             "q_reward_target": "q_reward", "mixer_reward_target": "mixer_reward"}
    before = {name: copy.deepcopy(getattr(agents, name).state_dict()) for name in pairs}
    omcda.update(agents, omcda.make_optimizers(agents, args), noisy(random_batch()), args)
    assert_polyak_step(before, agents, pairs, args.tau)


def test_policy_weights_are_clamped_at_z_clip():
    """exp(z) enters the policy loss clamped: z beyond +-z_clip weighs as much as z_clip (Hopper's z spread reached
    7-15)."""
    log_prob = torch.randn(2, 8)
    z = torch.tensor([30.0, -30.0, 12.0, 0.5]).repeat(2, 2)
    torch.testing.assert_close(omcda.policy_loss(log_prob, z, 10.0), omcda.policy_loss(log_prob, z.clamp(-10, 10), 10.0))


FROZEN = dict(q_lr=0.0, v_lr=0.0, policy_lr=0.0, alpha_lr=0.0)  # nothing learns: a stationary stream of estimates


def estimate_series(estimate_ema: float, updates: int = 300) -> dict[str, torch.Tensor]:
    """agents/kl and agents/influence after each update on fresh random minibatches, nothing learning."""
    args, agents = small_agents(alpha_init=0.3, estimate_ema=estimate_ema, **FROZEN)
    optimizers = omcda.make_optimizers(agents, args)
    series = [omcda.update(agents, optimizers, noisy(random_batch(seed=k)), args) for k in range(updates)]
    return {name: torch.stack([metrics[name] for metrics in series])[100:] for name in ("agents/kl", "agents/influence")}


def test_kl_and_influence_estimates_are_smoothed_across_minibatches():
    """On a stationary stream an exponential moving average at rate 0.05 has sqrt(0.05 / 1.95) = 0.16 of the spread
    of the single-minibatch estimates (rate 1): the KL the dual step reads and the influence the allocation reads
    are the smoothed ones (their spikes drove alpha_i upward on Hopper). Asserted below 0.5."""
    smoothed, single = estimate_series(0.05), estimate_series(1.0)
    for name in smoothed:
        ratio = smoothed[name].std(0) / single[name].std(0)
        assert (ratio < 0.5).all(), name


def test_influence_is_zero_when_the_reward_critic_is():
    """m_i = alpha_i Cov(x_i, z_i) / Var(z_i) with the reward part x_i = w̄^r_i (Q̄^r_i - V^r_i) / alpha_i: with
    Q̄^r = V^r = 0 there is no reward part, so every agent's influence is 0 after an update whatever z is; read
    off the soft critic instead, it is not."""
    args, agents = small_agents(alpha_init=0.3)
    with torch.no_grad():
        for network in (agents.q_reward_target, agents.v_reward):
            network.net[-1].weight.zero_()
            network.net[-1].bias.zero_()
    metrics = omcda.update(agents, omcda.make_optimizers(agents, args), noisy(random_batch()), args)
    torch.testing.assert_close(metrics["agents/influence"], torch.zeros(1, 2))
    _, with_reward = small_agents(alpha_init=0.3)
    metrics = omcda.update(with_reward, omcda.make_optimizers(with_reward, args), noisy(random_batch()), args)
    assert (metrics["agents/influence"].abs() > 1e-3).all()


def test_policy_starts_as_the_cloned_behaviour_policy():
    """Step 1 of OMCDA: pi_i starts as a copy of pi_b,i, so KL(pi || pi_b) = 0 before the first update."""
    dataset = chain_dataset()
    args, agents = small_agents(dataset.obs_dim, dataset.state_dim, bc_steps=5)
    initial = copy.deepcopy(agents.behaviour.state_dict())
    omcda.pretrain_behaviour(agents, dataset, args, torch.Generator().manual_seed(0))
    behaviour, policy = agents.behaviour.state_dict(), agents.policy.state_dict()
    assert any(not torch.equal(behaviour[key], initial[key]) for key in behaviour)  # cloning moved pi_b
    for key in behaviour:
        torch.testing.assert_close(policy[key], behaviour[key])
    batch = dataset.sample(32, torch.Generator().manual_seed(1))
    kl = omcda.extracted_policy_kl(agents.policy, agents.behaviour, batch.obs, batch.avail)
    torch.testing.assert_close(kl, torch.zeros_like(kl))
