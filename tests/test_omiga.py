"""OMIGA: the V loss's minimiser, the policy loss's direction, the values of a multi-step chain against their closed
form, learning on a toy task, and a smoke run."""

import copy

import numpy as np
import pytest
import torch

import omiga
from common.datasets import Batch, Dataset
from common.run import unique_dir
from conftest import (CHAIN_GAMMA, CHAIN_JOINT, assert_polyak_step, chain_dataset, chain_joint_batch,
                      chain_soft_optimum, exp_loss_fixed_point, perturb_, random_batch, run_script, smoke_run)


def test_value_loss_minimiser_is_closed_form():
    """With Q fixed, argmin_V E_mu[exp(w (Q - V)/alpha) + w V/alpha] = (alpha/w) log E_mu[exp(w Q/alpha)] (Eq. 10/11)."""
    alpha = 2.0
    q_values = torch.tensor([-1.0, 0.5, 2.0, 3.0])
    counts = torch.tensor([5, 3, 1, 1])  # behaviour probabilities mu = counts / 10
    q_batch = torch.repeat_interleave(q_values, counts)
    w = torch.tensor([[0.5], [3.0]]).expand(2, len(q_batch))  # two agents with different mixing weights
    v = torch.zeros(2, 1, requires_grad=True)
    optimizer = torch.optim.Adam([v], lr=0.05)
    for _ in range(3000):
        optimizer.zero_grad()
        omiga.value_loss(v.expand(2, len(q_batch)), q_batch.expand(2, -1), w, alpha, torch.zeros(2)).backward()
        optimizer.step()
    mu = counts / counts.sum()
    w_agent = w[:, 0]
    closed_form = alpha / w_agent * torch.log((mu * torch.exp(w_agent[:, None] * q_values / alpha)).sum(-1))
    torch.testing.assert_close(v.detach().squeeze(1), closed_form, atol=2e-3, rtol=0)
    # The two agents' values differ: the minimiser really depends on w (a loss without w would give equal values).
    assert abs(closed_form[0] - closed_form[1]) > 0.3


def test_value_loss_reaches_its_minimiser_under_minibatches():
    """std(z) = 3, minibatches of 128, plain SGD: the fixed point normalises, E_mu[exp(z)] = 1 (a per-minibatch max
    shift, as in the published code, gives about 2.9 here)."""
    normaliser = exp_loss_fixed_point(lambda v, q, shift: omiga.value_loss(v, q, torch.ones_like(q), 1.0, shift),
                                      omiga.track_shift)
    assert abs(normaliser - 1.0) < 0.05, normaliser


def test_policy_gradient_raises_high_advantage_action():
    torch.manual_seed(0)
    policy = omiga.AgentPolicy(1, 3, 1, 32)
    obs = torch.ones(1, 2, 3)
    actions = torch.tensor([[[-0.5], [0.5]]])  # [n=1, B=2, 1]
    z = torch.tensor([[-1.0, 1.0]])  # the second action has the higher advantage
    before = policy.log_prob(obs, actions).detach()
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    optimizer.zero_grad()
    omiga.policy_loss(policy.log_prob(obs, actions), z, z_clip=10.0).backward()
    optimizer.step()
    after = policy.log_prob(obs, actions).detach()
    gap_before, gap_after = before[0, 1] - before[0, 0], after[0, 1] - after[0, 0]
    assert gap_after > gap_before + 1e-4


def train_on_chain(dataset, updates: int) -> tuple[omiga.Args, omiga.Agents]:
    """OMIGA at alpha 1 trained on the chain for `updates` minibatches of 128."""
    args = omiga.Args(alpha=1.0, gamma=CHAIN_GAMMA, tau=0.05, hidden_dim=64, mixer_hidden_dim=32, q_lr=2e-3, v_lr=2e-3)
    agents = omiga.Agents(2, dataset.obs_dim, 1, 4, args)
    optimizers = omiga.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(updates):
        omiga.update(agents, optimizers, dataset.sample(128, generator), args)
    return args, agents


def test_values_match_the_soft_optimum_on_a_multi_step_chain():
    """gamma 0.8, no terminals, alpha 1: Q_tot and V_tot are the soft (KL-regularised) optimum's, which separates per
    agent on the chain: Q_tot = Q_0 + Q_1, V_tot = V_0 + V_1. A Q target without gamma V_tot(s') misses by > 1."""
    torch.manual_seed(0)
    dataset = chain_dataset()
    args, agents = train_on_chain(dataset, 3000)

    batch = chain_joint_batch(dataset)
    with torch.no_grad():
        w, b = agents.mixer(batch.states)
        q_tot, v_tot = omiga.mix(w, agents.q(batch.obs, batch.actions), b), omiga.mix(w, agents.v(batch.obs), b)[::4]
    (q_0, v_0, _), (q_1, v_1, _) = chain_soft_optimum(0, args.alpha), chain_soft_optimum(1, args.alpha)
    expected_q = [q_0[s0, a0] + q_1[s1, a1] for s0, s1, a0, a1 in CHAIN_JOINT]
    expected_v = [v_0[s0] + v_1[s1] for s0, s1, _, _ in CHAIN_JOINT[::4]]
    torch.testing.assert_close(q_tot, torch.tensor(expected_q, dtype=torch.float32), atol=0.08, rtol=0)
    torch.testing.assert_close(v_tot, torch.tensor(expected_v, dtype=torch.float32), atol=0.08, rtol=0)


def toy_dataset(n_samples: int = 4000, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """One-step cooperative task: r = -sum_i (a_i - a*_i)^2, behaviour a_i ~ clip(N(0, 0.5^2)); best a* = (0.6, -0.6)."""
    rng = np.random.default_rng(seed)
    best = np.array([0.6, -0.6], np.float32)
    actions = np.clip(rng.normal(0.0, 0.5, (n_samples, 2, 1)), -0.99, 0.99).astype(np.float32)
    rewards = -((actions[..., 0] - best) ** 2).sum(-1)
    local_obs = np.ones((n_samples, 2, 1), np.float32)
    states = np.ones((n_samples, 1), np.float32)
    arrays = dict(observations=local_obs, next_observations=local_obs, states=states, next_states=states,
                  actions=actions, rewards=rewards.astype(np.float32), terminals=np.ones(n_samples, bool),
                  timeouts=np.zeros(n_samples, bool))
    return Dataset(arrays, dict(obs_mode="local"), "local", "cpu"), best


def toy_return(policy, dataset: Dataset, best: np.ndarray) -> float:
    with torch.no_grad():
        action = policy.act(dataset.obs[:, :1]).squeeze().numpy()
    return float(-((action - best) ** 2).sum())


def behaviour_cloning_return(dataset: Dataset, best: np.ndarray, steps: int) -> float:
    """The baseline every algorithm must beat on the toy task: maximum-likelihood BC trained for as many updates."""
    torch.manual_seed(0)
    policy = omiga.AgentPolicy(dataset.n_agents, dataset.obs_dim, dataset.act_dim, 64)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = dataset.sample(128, generator)
        omiga.clipped_step(optimizer, -policy.log_prob(batch.obs, batch.actions).mean(1).sum(), 1.0)
    return toy_return(policy, dataset, best)


def test_a_terminal_transition_backs_up_nothing():
    """On the chain with every transition out of joint state (1, 1) terminal, Q_tot there is the reward alone, while
    the next states' values are far from 0 (a backup without (1 - done) would add gamma V_tot(s') to it)."""
    torch.manual_seed(0)
    dataset = chain_dataset(terminal_state=3)
    _, agents = train_on_chain(dataset, 2000)
    batch = chain_joint_batch(dataset)
    terminal = batch.dones.bool()
    with torch.no_grad():
        w, b = agents.mixer(batch.states)
        q_tot = omiga.mix(w, agents.q(batch.obs, batch.actions), b)
        next_w, next_b = agents.mixer(batch.next_states)
        next_v_tot = omiga.mix(next_w, agents.v(batch.next_obs), next_b)
    assert terminal.sum() == 4
    torch.testing.assert_close(q_tot[terminal], batch.rewards[terminal], atol=0.1, rtol=0)
    assert (CHAIN_GAMMA * next_v_tot[terminal]).abs().max() > 0.5  # what a missing (1 - done) would add to one


def test_omiga_beats_behaviour_cloning_on_toy_task():
    torch.manual_seed(0)
    dataset, best = toy_dataset()
    args = omiga.Args(alpha=0.5, hidden_dim=64, mixer_hidden_dim=16, q_lr=3e-3, v_lr=3e-3, policy_lr=3e-3)
    agents = omiga.Agents(2, dataset.obs_dim, 1, 1, args)
    optimizers = omiga.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(1500):
        omiga.update(agents, optimizers, dataset.sample(128, generator), args)
    omiga_return, bc_return = toy_return(agents.policy, dataset, best), behaviour_cloning_return(dataset, best, 1500)
    # BC recovers the behaviour mean (0, 0): return about -0.72. OMIGA must move clearly towards a*.
    assert bc_return < -0.5
    assert omiga_return > bc_return + 0.3, (omiga_return, bc_return)


def test_smoke_run_writes_logs_checkpoint_and_final_line(tiny_hopper_dir, tmp_path):
    run = smoke_run("omiga.py", tiny_hopper_dir, tmp_path)
    assert {"losses/v", "losses/q", "losses/policy"} <= run.scalars
    assert {"v", "q", "policy"} <= set(run.checkpoint["optimizers"])


def test_missing_dataset_without_generation_says_how_to_make_it(tmp_path):
    result = run_script("omiga.py", "--data-dir", str(tmp_path / "nowhere"), "--no-generate", "--total-steps", "1",
                        cwd=tmp_path)
    assert result.returncode != 0
    assert "python -m common.collect dataset --env Hopper --quality medium-replay" in result.stderr


def test_tanh_gaussian_log_prob_matches_torch_transformed_distribution():
    torch.manual_seed(0)
    mean, log_std = torch.randn(3, 6, 2), 0.5 * torch.randn(3, 6, 2)
    actions = torch.rand(3, 6, 2) * 1.8 - 0.9
    squashed = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()])
    torch.testing.assert_close(omiga.tanh_gaussian_log_prob(mean, log_std, actions), squashed.log_prob(actions).sum(-1),
                               atol=1e-4, rtol=1e-4)


def test_runs_started_in_the_same_second_get_separate_directories(tmp_path):
    base = tmp_path / "runs" / "Hopper__medium-replay__omiga__1__1700000000"
    first, second = unique_dir(base), unique_dir(base)
    assert first == base and second.name == base.name + "_2" and second.is_dir()


def test_shared_and_per_agent_layers_are_one_matmul_equal_to_separate_linears():
    """G = 1 applies one nn.Linear to every agent's rows; G = n one per agent; G = 2 over [2n, B] (ICQ's twins) one per
    twin. The default networks are shared (one weight set), --per-agent-networks gives n."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, 4)
    for weight_sets, group_of_row in ((1, [0] * 6), (6, range(6)), (2, [0, 0, 0, 1, 1, 1])):
        layer = omiga.BatchedLinear(weight_sets, 4, 3)
        expected = torch.stack([x[row] @ layer.weight[group] + layer.bias[group, 0]
                                for row, group in enumerate(group_of_row)])
        torch.testing.assert_close(layer(x), expected)
    args = omiga.Args()
    assert omiga.Agents(3, 7, 1, 5, args).v.net[0].weight.shape == (1, 7, 256)
    assert omiga.Agents(3, 7, 1, 5, omiga.Args(per_agent_networks=True)).v.net[0].weight.shape == (3, 7, 256)


def one_update_metrics(agents: omiga.Agents, args: omiga.Args, batch) -> dict[str, torch.Tensor]:
    return omiga.update(agents, omiga.make_optimizers(agents, args), batch, args)


@pytest.mark.parametrize("online, unchanged, moved", [
    ("v", ["losses/q"], "losses/v"),                     # Q's target reads V̄ and the target mixer at s'
    ("mixer", ["losses/v", "losses/policy"], "losses/q"),  # z reads the target mixer's w̄
    ("q", ["losses/v", "losses/policy"], "losses/q"),      # z reads Q̄
])
def test_losses_read_the_target_networks_where_the_maths_has_them(online, unchanged, moved):
    """Perturbing an online network before one update leaves every loss whose inputs are target networks unchanged
    (targets are separate copies): a loss that read the online network instead would move."""
    torch.manual_seed(0)
    args = omiga.Args(hidden_dim=16, mixer_hidden_dim=8)
    base = omiga.Agents(2, 3, 1, 4, args)
    perturbed = copy.deepcopy(base)
    perturb_(getattr(perturbed, online))
    batch = random_batch()
    expected, got = one_update_metrics(base, args, batch), one_update_metrics(perturbed, args, batch)
    for name in unchanged:
        torch.testing.assert_close(got[name], expected[name], msg=lambda m: f"{name}: {m}")
    assert not torch.allclose(got[moved], expected[moved])  # the perturbation itself shows


def test_targets_are_polyak_averages_of_the_online_networks():
    torch.manual_seed(0)
    args = omiga.Args(hidden_dim=16, mixer_hidden_dim=8, tau=0.3)
    agents = omiga.Agents(2, 3, 1, 4, args)
    pairs = {"v_target": "v", "q_target": "q", "mixer_target": "mixer"}
    before = {name: copy.deepcopy(getattr(agents, name).state_dict()) for name in pairs}
    one_update_metrics(agents, args, random_batch())
    assert_polyak_step(before, agents, pairs, args.tau)


def test_policy_weights_are_clamped_at_z_clip():
    """exp(z) enters the policy loss clamped: z beyond +-z_clip weighs as much as z_clip, so one sample far in the
    tail cannot dominate a minibatch (Hopper's z spread reached 7-15)."""
    log_prob = torch.randn(2, 8)
    z = torch.tensor([30.0, -30.0, 12.0, 0.5]).repeat(2, 2)
    loss, clamped = omiga.policy_loss(log_prob, z, 10.0), omiga.policy_loss(log_prob, z.clamp(-10.0, 10.0), 10.0)
    torch.testing.assert_close(loss, clamped)
    assert torch.isfinite(loss)


def test_update_moves_the_value_shift_towards_the_minibatch_max_of_z():
    """With every learning rate 0 and one minibatch repeated, z is fixed and the shift c after k updates is
    (1 - (1 - tau)^k) max_B z: the update tracks it itself, as L_V's unbiasedness needs."""
    torch.manual_seed(0)
    args = omiga.Args(hidden_dim=16, mixer_hidden_dim=8, alpha=0.05, tau=0.1, q_lr=0.0, v_lr=0.0, policy_lr=0.0)
    agents = omiga.Agents(2, 3, 1, 4, args)
    optimizers, batch = omiga.make_optimizers(agents, args), random_batch()
    with torch.no_grad():
        w, _ = agents.mixer_target(batch.states)
        z_max = (w * (agents.q_target(batch.obs, batch.actions) - agents.v(batch.obs)) / args.alpha).max(-1).values
    for _ in range(20):
        omiga.update(agents, optimizers, batch, args)
    torch.testing.assert_close(agents.value_shift, (1 - (1 - args.tau) ** 20) * z_max[None])
    assert (agents.value_shift.abs() > 0.01).all()


def test_the_mixers_state_bias_carries_what_the_agents_cannot_see():
    """One agent that sees only a constant, one action, two equally likely states with rewards +1 and -1, every
    transition terminal: Q_tot(s) = r(s) needs b(s), since w(s) >= 0 times one local value has a single sign."""
    torch.manual_seed(0)
    state = torch.arange(256) % 2
    batch = Batch(obs=torch.ones(1, 256, 1), actions=torch.zeros(1, 256, 1), rewards=1.0 - 2.0 * state.float(),
                  next_obs=torch.ones(1, 256, 1), dones=torch.ones(256), states=torch.eye(2)[state],
                  next_states=torch.eye(2)[state])
    args = omiga.Args(hidden_dim=16, mixer_hidden_dim=8, q_lr=3e-3, v_lr=3e-3)
    agents = omiga.Agents(1, 1, 1, 2, args)
    optimizers = omiga.make_optimizers(agents, args)
    for _ in range(500):
        omiga.update(agents, optimizers, batch, args)
    with torch.no_grad():
        w, b = agents.mixer(batch.states[:2])
        q_tot = omiga.mix(w, agents.q(batch.obs[:, :2], batch.actions[:, :2]), b)
    torch.testing.assert_close(q_tot, torch.tensor([1.0, -1.0]), atol=0.1, rtol=0)
