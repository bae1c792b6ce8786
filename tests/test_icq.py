"""ICQ: batch-softmax weights, the target's two limits, in-sample next actions, learning on toy tasks, a smoke run."""


import numpy as np
import torch

import icq
from common.datasets import Dataset, dataset_path, load_dataset
from conftest import smoke_run
from test_omiga import behaviour_cloning_return, toy_dataset, toy_return


def episodes_dataset(states: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminals: np.ndarray,
                     timeouts: np.ndarray) -> Dataset:
    """One agent observing the state [N, d]; the next state is the next row (episodes are contiguous)."""
    n = len(rewards)
    states = states.astype(np.float32)
    next_states = np.roll(states, -1, 0)
    arrays = dict(observations=states[:, None], next_observations=next_states[:, None], states=states,
                  next_states=next_states, actions=actions.reshape(n, 1, 1).astype(np.float32),
                  rewards=rewards.astype(np.float32), terminals=terminals, timeouts=timeouts)
    return Dataset(arrays, dict(obs_mode="local"), "local", "cpu")


def test_batch_softmax_weights_average_one_over_live_entries():
    values = torch.randn(3, 128) * 5.0
    for temperature in (0.1, 1.0, 100.0):
        torch.testing.assert_close(icq.batch_softmax_weights(values, temperature).sum(-1), torch.full((3,), 128.0))
    live = torch.rand(128) < 0.7
    weights = icq.batch_softmax_weights(values, 1.0, live)
    torch.testing.assert_close(weights.sum(-1), torch.full((3,), float(live.sum())))
    assert (weights[:, ~live] == 0).all() and (weights[:, live] > 0).all()
    # A batch of terminals only (every transition of the toy task): all weights zero, no NaN.
    assert (icq.batch_softmax_weights(values, 1.0, torch.zeros(128, dtype=torch.bool)) == 0).all()


def random_transitions(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(64, generator=generator)
    dones = (torch.rand(64, generator=generator) < 0.2).float()
    next_q_tot = 3.0 * torch.randn(64, generator=generator)
    return rewards, dones, next_q_tot


def test_target_tends_to_sarsa_target_as_alpha_grows():
    rewards, dones, next_q_tot = random_transitions()
    sarsa = rewards + 0.9 * (1 - dones) * next_q_tot
    target, _ = icq.icq_target(rewards, dones, next_q_tot, gamma=0.9, alpha=1e6)
    torch.testing.assert_close(target, sarsa, atol=1e-4, rtol=0)
    # At a temperature of the order of the values' spread the reweighting is far from SARSA: alpha matters.
    target, _ = icq.icq_target(rewards, dones, next_q_tot, gamma=0.9, alpha=1.0)
    assert (target - sarsa).abs().max() > 1.0


def test_target_batch_average_tends_to_best_next_value_as_alpha_shrinks():
    rewards, dones, next_q_tot = random_transitions()
    live = dones == 0
    target, rho = icq.icq_target(rewards, dones, next_q_tot, gamma=0.9, alpha=1e-3)
    bootstrapped = (target - rewards) / 0.9
    # E_mu[exp(Q/alpha) Q] / E_mu[exp(Q/alpha)] over the batch -> the best next value among the non-terminal samples,
    # which is not the best over all samples in this batch: terminals stay out.
    best = next_q_tot[live].max()
    assert best < next_q_tot.max()
    torch.testing.assert_close(bootstrapped[live].mean(), best, atol=1e-4, rtol=0)
    torch.testing.assert_close(target[~live], rewards[~live])
    assert rho.max() == live.sum()


def test_sampler_pairs_each_step_with_the_next_step_of_its_episode():
    # Episodes: steps 0-2 end in a terminal, 3-4 in a timeout, 5-6 at the end of the data (no flag).
    terminals = np.array([0, 0, 1, 0, 0, 0, 0], bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0], bool)
    dataset = episodes_dataset(np.arange(7)[:, None], np.arange(7) / 10, np.zeros(7), terminals, timeouts)
    sampler = icq.NextActionSampler(dataset)
    # A timeout or the end of the data needs a next action to bootstrap on and has none: not sampled.
    assert sampler.indices.tolist() == [0, 1, 2, 3, 5]
    assert sampler.next_indices.tolist() == [1, 2, 2, 4, 6]
    batch = sampler.sample(256, torch.Generator().manual_seed(0))
    step = batch.states[:, 0]
    assert set(step.long().tolist()) == {0, 1, 2, 3, 5}
    expected_next_action = torch.where(batch.dones == 1, step, step + 1) / 10
    torch.testing.assert_close(batch.next_actions[0, :, 0], expected_next_action)


def test_sampler_next_step_matches_next_state_in_a_collected_file(tiny_hopper_dir):
    dataset = load_dataset(dataset_path(tiny_hopper_dir, "Hopper", "3x1", "medium-replay"), "cpu", "state")
    sampler = icq.NextActionSampler(dataset)
    bootstrapped = dataset.dones[sampler.indices] == 0
    index, next_index = sampler.indices[bootstrapped], sampler.next_indices[bootstrapped]
    torch.testing.assert_close(dataset.states[next_index], dataset.next_states[index])
    torch.testing.assert_close(dataset.obs[:, next_index], dataset.next_obs[:, index])
    # Exactly the episodes not ended by a terminal lose their last transition.
    episode_ends = torch.cat([dataset.episode_starts[1:] - 1, torch.tensor([len(dataset) - 1])])
    assert len(dataset) - len(sampler) == int((dataset.dones[episode_ends] == 0).sum()) > 0


def test_sampler_keeps_every_transition_of_an_all_terminal_dataset():
    dataset, _ = toy_dataset(n_samples=100)
    sampler = icq.NextActionSampler(dataset)
    assert sampler.indices.tolist() == list(range(100)) == sampler.next_indices.tolist()


def test_critic_bootstraps_on_the_dataset_next_action():
    """Two-step episodes: a0 ~ U, r0 = 0; then a1 = -a0 (the data's next action), r1 = a1, terminal.
    With alpha -> infinity T_IC is SARSA, so Q(s0, a0) = gamma a1 = -gamma a0. Bootstrapping on the current action
    instead would give +gamma a0, and on a policy's action a constant."""
    torch.manual_seed(0)
    first = np.random.default_rng(0).uniform(-0.9, 0.9, 2000)
    actions = np.stack([first, -first], 1).reshape(-1)
    rewards = np.stack([np.zeros_like(first), -first], 1).reshape(-1)
    step_in_episode = np.tile(np.eye(2), (2000, 1))
    dataset = episodes_dataset(step_in_episode, actions, rewards, np.tile([False, True], 2000), np.zeros(4000, bool))
    args = icq.Args(gamma=0.9, tau=0.05, alpha=1e6, hidden_dim=64, mixer_hidden_dim=16, q_lr=3e-3)
    agents = icq.Agents(1, dataset.obs_dim, 1, dataset.state_dim, args)
    optimizers = icq.make_optimizers(agents, args)
    sampler, generator = icq.NextActionSampler(dataset), torch.Generator().manual_seed(0)
    for _ in range(500):
        icq.update(agents, optimizers, sampler.sample(128, generator), args)
    grid = torch.linspace(-0.8, 0.8, 9)
    with torch.no_grad():
        for step, slope in ((0, -0.9), (1, 1.0)):
            w, b = agents.mixer(dataset.states[step].expand(9, -1))
            q = agents.q(dataset.obs[:, step : step + 1].expand(1, 9, -1), grid[None, :, None]).min(0).values
            q_tot = icq.mix(w, q, b)
            fitted = float(torch.linalg.lstsq(torch.stack([grid, torch.ones(9)], 1), q_tot[:, None]).solution[0, 0])
            assert abs(fitted - slope) < 0.2, (step, fitted)


def test_icq_beats_behaviour_cloning_on_toy_task():
    torch.manual_seed(0)
    dataset, best = toy_dataset()
    args = icq.Args(beta=0.2, hidden_dim=64, mixer_hidden_dim=16, q_lr=3e-3, policy_lr=3e-3)
    agents = icq.Agents(2, dataset.obs_dim, 1, 1, args)
    optimizers = icq.make_optimizers(agents, args)
    sampler, generator = icq.NextActionSampler(dataset), torch.Generator().manual_seed(0)
    for _ in range(1000):
        icq.update(agents, optimizers, sampler.sample(128, generator), args)
    icq_return, bc_return = toy_return(agents.policy, dataset, best), behaviour_cloning_return(dataset, best, 1000)
    # BC recovers the behaviour mean (0, 0): return about -0.72. The weights exp(w_i Q_i / beta) tilt each agent's
    # N(0, 0.5^2) behaviour towards a*_i: its mean moves to a* 0.25 / (0.25 + beta / 2), a return of about -0.06.
    assert bc_return < -0.5
    assert icq_return > bc_return + 0.4, (icq_return, bc_return)


def test_smoke_run_writes_logs_checkpoint_and_final_line(tiny_hopper_dir, tmp_path):
    run = smoke_run("icq.py", tiny_hopper_dir, tmp_path)
    assert set(run.checkpoint["optimizers"]) == {"q", "policy"}
    assert any(key.startswith("mixer_target.") for key in run.checkpoint["agents"])