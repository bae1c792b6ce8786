"""BCQ-MA and the decentralized framework of Jiang & Lu ("Offline Decentralized Multi-Agent Reinforcement Learning"):
the matrix game of that paper's Tables 1-4 under the four flag settings, the reweighted transition probabilities, the
value deviation's sample estimator, the transition normalization's latent density ratio, the VAE, the perturbation's
range, the candidate argmax, learning on a toy task, and a smoke run read back by benchmarks/bcq_ma_values.py."""

import math
import sys

import pytest
import torch

import bcq_ma
from common.datasets import Batch
from conftest import REPO, smoke_run
from test_cql_ma import chain_batch
from test_omiga import behaviour_cloning_return, toy_dataset, toy_return

sys.path.insert(0, str(REPO / "benchmarks"))
import bcq_ma_values  # noqa: E402

# Jiang & Lu's matrix game (its Table 1): payoff[a_1, a_2], behaviour policies [0.8, 0.2] and [0.4, 0.6].
PAYOFF = torch.tensor([[1.0, 5.0], [6.0, 1.0]])
BEHAVIOUR = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
GAMMA, OPTIMISM = 0.9, 0.9  # epsilon 0.9 (Jiang & Lu's MPE value) leaves every lambda_vd of the game unclipped


def game_transitions() -> tuple[torch.Tensor, ...]:
    """The game as two-step episodes, every joint action once with its behaviour frequency as a weight: from s_0 the
    joint action (a_1, a_2) leads with r = 0 to the cell state c = 1 + 2 a_1 + a_2, whose transition (same actions)
    pays the cell's payoff and ends the episode (next state 5, done). So V*(c) = payoff, the paper's next-state value.
    Returns states, actions [2, T], rewards, next states, dones, frequencies."""
    rows = []
    for a1 in range(2):
        for a2 in range(2):
            frequency, cell = float(BEHAVIOUR[0, a1] * BEHAVIOUR[1, a2]), 1 + 2 * a1 + a2
            rows += [(0, a1, a2, 0.0, cell, 0.0, frequency), (cell, a1, a2, float(PAYOFF[a1, a2]), 5, 1.0, frequency)]
    columns = list(zip(*rows))
    states, rewards, next_states = torch.tensor(columns[0]), torch.tensor(columns[3]), torch.tensor(columns[4])
    actions = torch.tensor([columns[1], columns[2]])
    return states, actions, rewards, next_states, torch.tensor(columns[5]), torch.tensor(columns[6])


def tabular_transition_normalization(states, actions, next_states, frequencies) -> torch.Tensor:
    """lambda_tn = 1 / P_B(s' | s, a_i) from each agent's own data (Jiang & Lu, Sec. 3.2): [2, T]."""
    weights = torch.ones(actions.shape)
    for agent in range(2):
        for t in range(len(states)):
            same = (states == states[t]) & (actions[agent] == actions[agent, t])
            weights[agent, t] = frequencies[same].sum() / frequencies[same & (next_states == next_states[t])].sum()
    return weights


def learn_matrix_game(value_deviation: bool, transition_normalization: bool, steps: int = 1000) -> torch.Tensor:
    """Independent tabular Q-learning of the two agents, each on its own (s, a_i, r, s'), on the script's weighted TD
    objective (Jiang & Lu Eq. 1: `td_loss` with `objective_weights`), lambda_vd from the script's sample estimator on
    the target table. Returns each agent's Q_i(s_0, .) / gamma, the expected next-state value: [2 agents, 2 actions]."""
    states, actions, rewards, next_states, dones, frequencies = game_transitions()
    lambda_tn = tabular_transition_normalization(states, actions, next_states, frequencies)
    agent = torch.arange(2)[:, None]
    states, next_states = states.expand(2, -1), next_states.expand(2, -1)
    q = torch.zeros(2, 6, 2, requires_grad=True)  # [agent, state, own action]
    q_target = q.detach().clone()
    optimizer = torch.optim.Adam([q], lr=0.05)
    for _ in range(steps):
        with torch.no_grad():
            next_value = q_target[agent, next_states].max(-1).values  # V*_i(s') = max over own actions
            target = rewards + GAMMA * (1.0 - dones) * next_value
            lambda_vd = (bcq_ma.value_deviation_weight(next_value, q_target[agent, states, actions], rewards, dones,
                                                       GAMMA, OPTIMISM) if value_deviation else None)
            weight = bcq_ma.objective_weights(lambda_vd, lambda_tn if transition_normalization else None)
        loss = bcq_ma.td_loss(q[agent, states, actions], target, weight * frequencies * len(frequencies))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        q_target.lerp_(q.detach(), 0.2)
    return q.detach()[:, 0] / GAMMA


def reweighted_expectation(probs: torch.Tensor, values: torch.Tensor, value_deviation: bool,
                           transition_normalization: bool) -> torch.Tensor:
    """E_{hat-P}[V*] from the paper's formula with the exact E_{P_B} V* in lambda_vd, unclipped (with E_{P_B} V*,
    lambda_vd reaches 3 in the game; the tables apply no clip)."""
    hat_p = bcq_ma.reweighted_transitions(probs, values, None, value_deviation, transition_normalization, math.inf)
    return (hat_p * values).sum(-1)


def next_state_distributions() -> tuple[torch.Tensor, torch.Tensor]:
    """Per agent and own action, the behaviour distribution over the two next states (the partner's actions) and their
    values: probs, values [2 agents, 2 actions, 2 partner actions]."""
    probs = torch.stack([BEHAVIOUR[1].expand(2, -1), BEHAVIOUR[0].expand(2, -1)])
    values = torch.stack([PAYOFF, PAYOFF.T])
    return probs, values


# Jiang & Lu's Tables 2-4: expected returns of each agent's actions [agent 1: a_1, a_2; agent 2: a_1, a_2], the joint
# action the agents learn, and its payoff. "tn" is not in the paper (Section 5.1 shows no lambda_tn-only table).
PAPER = {
    (False, False): ([[3.4, 3.0], [2.0, 4.2]], (0, 1), 5.0),  # Table 2: independent learning -> (a1, a2)
    (True, False): ([[4.52, 5.0], [4.0, 4.8]], (1, 1), 1.0),  # Table 3: lambda_vd -> (a2, a2)
    (True, True): ([[4.33, 5.29], [5.29, 4.33]], (1, 0), 6.0),  # Table 4: MABCQ -> the optimum (a2, a1)
    (False, True): ([[3.0, 3.5], [3.5, 3.0]], (1, 0), 6.0),  # ours: uniform next states
}


@pytest.mark.parametrize("flags", list(PAPER), ids=["bcq", "bcq_vd", "mabcq", "bcq_tn"])
def test_matrix_game_learns_the_papers_joint_actions_and_values(flags):
    values = learn_matrix_game(*flags)
    expected_values, joint_action, payoff = PAPER[flags]
    probs, next_values = next_state_distributions()
    # Q-learning's fixed point is the reweighted expectation exactly; the paper's tables round to two digits.
    torch.testing.assert_close(values, reweighted_expectation(probs, next_values, *flags), atol=2e-3, rtol=0)
    torch.testing.assert_close(values, torch.tensor(expected_values), atol=0.015, rtol=0)
    assert tuple(values.argmax(-1).tolist()) == joint_action
    assert PAYOFF[joint_action] == payoff


# Jiang & Lu's reweighted transition probabilities P(partner's a_1), P(partner's a_2) per agent and own action.
PAPER_TRANSITIONS = {
    (False, False): [[[0.4, 0.6], [0.4, 0.6]], [[0.8, 0.2], [0.8, 0.2]]],  # Table 2
    (True, False): [[[0.12, 0.88], [0.8, 0.2]], [[0.4, 0.6], [0.95, 0.05]]],  # Table 3
    (True, True): [[[0.17, 0.83], [0.86, 0.14]], [[0.14, 0.86], [0.83, 0.17]]],  # Table 4
}


def test_reweighted_transitions_match_tables_2_to_4_and_sum_to_one():
    probs, values = next_state_distributions()
    for flags, table in PAPER_TRANSITIONS.items():
        hat_p = bcq_ma.reweighted_transitions(probs, values, None, *flags, math.inf)
        torch.testing.assert_close(hat_p, torch.tensor(table), atol=0.006, rtol=0)
    # With an estimated E V* (not E_{P_B} V*: the sample estimator's), or with lambda_tn, sum_s' P_B lambda differs
    # from one: the normaliser z makes hat-P a distribution, also for negative values and unseen next states.
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 4, generator=generator) * (torch.rand(50, 4, generator=generator) > 0.2)
    probs[:, 0] += 0.1
    probs = probs / probs.sum(-1, keepdim=True)
    values = 4.0 * torch.randn(50, 4, generator=generator) + 2.0
    estimated = (probs * values).sum(-1) + torch.randn(50, generator=generator)
    for flags in [(True, False), (False, True), (True, True)]:
        unnormalised_sum = (probs * bcq_ma.objective_weights(
            bcq_ma.value_deviation(values, estimated[:, None], OPTIMISM) if flags[0] else None,
            torch.where(probs > 0, 1.0 / probs.clamp_min(1e-12), 0.0) if flags[1] else None)).sum(-1)
        assert (unnormalised_sum - 1.0).abs().max() > 0.1  # the normaliser matters
        hat_p = bcq_ma.reweighted_transitions(probs, values, estimated, *flags, OPTIMISM)
        torch.testing.assert_close(hat_p.sum(-1), torch.ones(50))
        assert (hat_p >= 0).all() and (hat_p[probs == 0] == 0).all()
    # lambda_tn alone makes the seen next states uniform (Jiang & Lu, Sec. 3.2).
    hat_p = bcq_ma.reweighted_transitions(probs, values, None, False, True, OPTIMISM)
    torch.testing.assert_close(hat_p, (probs > 0).float() / (probs > 0).sum(-1, keepdim=True))


def test_value_deviation_estimator_from_one_sample():
    """E V*(s') = (Q̂(s, a) - r) / gamma: Q̂ = 4.4, r = 0.5, gamma 0.9 give E V* = 4.333..., so V*(s') = 5 is
    1 + 0.667 / 4.333 = 1.1538; a terminal s' has V* = 0 (clipped at 1 - eps); a high value is clipped at 1 + eps;
    with E V* < 0 a higher V* still weighs more (the division is by |E V*|)."""
    q_target = torch.tensor([[4.4, 4.4, 4.4, -1.3]])
    rewards, dones = torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    next_value = torch.tensor([[5.0, 5.0, 20.0, -1.0]])
    weight = bcq_ma.value_deviation_weight(next_value, q_target, rewards, dones, 0.9, 0.8)
    expected_value = 3.9 / 0.9
    torch.testing.assert_close(weight, torch.tensor([[1.0 + (5.0 - expected_value) / expected_value, 0.2, 1.8,
                                                      1.0 + (-1.0 + 2.0) / 2.0]]))


def test_transition_normalization_is_the_latent_density_ratio():
    generator = torch.Generator().manual_seed(0)
    mean, transition_mean = torch.randn(2, 5, 3, generator=generator), torch.randn(2, 5, 3, generator=generator)
    unit = torch.distributions.Normal(0.0, 1.0)
    ratio = (unit.log_prob(mean).sum(-1) - unit.log_prob(transition_mean).sum(-1)).exp()
    weight = bcq_ma.transition_normalization_weight(mean, transition_mean, tn_max=1e6)
    torch.testing.assert_close(weight, ratio)
    clipped = bcq_ma.transition_normalization_weight(mean, 3.0 * transition_mean, tn_max=2.0)
    assert clipped.max() <= 2.0 + 1e-6 and clipped.min() >= 0.5 - 1e-6 and (clipped == 2.0).any()


def test_vae_reconstructs_dataset_actions():
    """Two agents, o ~ U(-1, 1), a_0 = 0.7 sin(2.5 o) + noise and a_1 = -0.5 o + noise (std 0.05): the VAE's
    reconstructions and its clipped-prior samples must lie far closer to the data than the behaviour's spread."""
    torch.manual_seed(0)
    obs = torch.rand(1, 2048, 1).expand(2, -1, -1) * 2.0 - 1.0
    means = torch.stack([0.7 * torch.sin(2.5 * obs[0]), -0.5 * obs[1]])
    actions = means + 0.05 * torch.randn_like(means)
    vae = bcq_ma.BatchedVAE(2, 1, 1, 2, 64, latent_clip=0.5)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(600):
        idx = torch.randint(2048, (128,))
        recon, mean, log_std = vae(obs[:, idx], actions[:, idx])
        bcq_ma.gradient_step(optimizer, bcq_ma.vae_loss(recon, actions[:, idx], mean, log_std, 0.5))
    with torch.no_grad():
        spread = actions.var(1).squeeze(-1)  # about 0.2 and 0.08
        reconstruction_error = (vae(obs, actions)[0] - actions).pow(2).mean((1, 2))
        sample_error = (vae.decode(obs) - means).pow(2).mean((1, 2))
    assert (reconstruction_error < 0.05 * spread).all(), (reconstruction_error, spread)
    assert (sample_error < 0.05 * spread).all(), (sample_error, spread)
    vae.latent_clip = 0.0  # prior samples are clipped to [-latent_clip, latent_clip]
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(obs), vae.decode(obs, torch.zeros(2, 2048, 2)))


def test_perturbation_stays_within_phi_and_in_the_action_box():
    torch.manual_seed(0)
    perturbation = bcq_ma.Perturbation(3, 4, 2, 32, phi=0.05)
    with torch.no_grad():
        for parameter in perturbation.parameters():
            parameter.mul_(30.0)  # saturate the tanh
    obs, actions = torch.randn(3, 500, 4), torch.rand(3, 500, 2) * 2.0 - 1.0
    with torch.no_grad():
        perturbed = perturbation(obs, actions)
    shift = perturbed - actions
    assert shift.abs().max() <= 0.05 + 1e-6 and perturbed.abs().max() <= 1.0
    interior = actions.abs() < 0.9
    assert shift[interior].abs().max() > 0.049  # the full range [-Phi, Phi] is reachable


def small_args(**overrides) -> bcq_ma.Args:
    return bcq_ma.Args(**{"hidden_dim": 32, "vae_hidden_dim": 32, **overrides})


def test_soft_clipped_target_and_candidate_argmax():
    q1, q2 = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])
    torch.testing.assert_close(bcq_ma.soft_clipped_q(q1, q2, 0.75), torch.tensor([1.5, 2.5]))
    torch.manual_seed(0)
    agents = bcq_ma.Agents(2, 3, 2, 3, small_args())
    obs = torch.randn(2, 7, 3)
    torch.manual_seed(1)
    repeated, candidates = bcq_ma.sample_candidates(agents.vae, agents.perturbation, obs, 10)
    with torch.no_grad():
        q1, q2 = agents.critic(repeated, candidates)
        torch.manual_seed(1)
        value = bcq_ma.candidate_value(agents.critic, agents.perturbation, agents.vae, obs, 10, 0.75)
        torch.manual_seed(1)
        acted = agents.policy.act(obs)
    torch.testing.assert_close(value, bcq_ma.soft_clipped_q(q1, q2, 0.75).unflatten(1, (7, 10)).max(-1).values)
    best = q1.unflatten(1, (7, 10)).argmax(-1)
    torch.testing.assert_close(acted, candidates.unflatten(1, (7, 10))[torch.arange(2)[:, None], torch.arange(7), best])


def test_update_with_both_weights_returns_finite_weighted_metrics():
    torch.manual_seed(0)
    args = small_args(value_deviation=True, transition_normalization=True, optimism=0.5)
    agents = bcq_ma.Agents(2, 3, 1, 3, args)
    optimizers = bcq_ma.make_optimizers(agents, args)
    obs = torch.randn(2, 64, 3)
    batch = Batch(obs=obs, actions=torch.rand(2, 64, 1) * 2 - 1, rewards=torch.rand(64) + 1.0, next_obs=obs.roll(1, 1),
                  dones=torch.zeros(64), states=obs[0], next_states=obs[0].roll(1, 0))
    for _ in range(5):
        metrics = bcq_ma.update(agents, optimizers, batch, args)
    assert all(torch.isfinite(value).all() for value in metrics.values())
    assert 0.5 <= metrics["values/lambda_vd"] <= 1.5 and metrics["agents/lambda_tn"].shape == (2,)
    assert {"losses/vae", "losses/transition_vae", "losses/critic", "losses/perturbation",
            "values/value_spread"} <= set(metrics)
    assert set(optimizers) == {"vae", "critic", "perturbation"}


def test_value_spread_is_the_batch_mean_of_each_states_max_minus_min_over_agents():
    values = torch.tensor([[1.0, 5.0, 0.0], [3.0, 2.0, 0.0], [2.0, 4.0, 6.0]])  # [agents, states]
    # Per state: 3 - 1, 5 - 2, 6 - 0; the spread of the agents' batch means would be 4 - 2.
    assert bcq_ma.value_spread(values).item() == pytest.approx((2.0 + 3.0 + 6.0) / 3)


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["bcq", "bcq_vd", "bcq_tn", "mabcq"])
def test_update_weights_both_objectives_by_the_flags_lambdas(flags, monkeypatch):
    """update() must pass w = lambda_vd lambda_tn (each factor only under its flag) to both critics' TD losses and to
    the perturbation loss, with the lambdas its own estimators computed in that update."""
    recorded = {"lambda_vd": [], "lambda_tn": [], "td": [], "perturbation": [], "next_value": [], "target": []}

    def recording(function_name, **extractors):
        function = getattr(bcq_ma, function_name)

        def wrapper(*args):
            result = function(*args)
            for name, extract in extractors.items():
                recorded[name].append(extract(args, result))
            return result
        monkeypatch.setattr(bcq_ma, function_name, wrapper)

    recording("value_deviation_weight", lambda_vd=lambda args, result: result)
    recording("transition_normalization_weight", lambda_tn=lambda args, result: result)
    recording("td_loss", td=lambda args, result: args[2], target=lambda args, result: args[1])
    recording("perturbation_loss", perturbation=lambda args, result: args[1])
    recording("candidate_value", next_value=lambda args, result: result)
    torch.manual_seed(0)
    args = small_args(value_deviation=flags[0], transition_normalization=flags[1], optimism=0.5)
    agents = bcq_ma.Agents(2, 3, 1, 3, args)
    optimizers = bcq_ma.make_optimizers(agents, args)
    obs = torch.randn(2, 64, 3)
    batch = Batch(obs=obs, actions=torch.rand(2, 64, 1) * 2 - 1, rewards=torch.rand(64) + 1.0, next_obs=obs.roll(1, 1),
                  dones=(torch.rand(64) < 0.2).float(), states=obs[0], next_states=obs[0].roll(1, 0))
    for _ in range(3):
        metrics = bcq_ma.update(agents, optimizers, batch, args)
    assert len(recorded["td"]) == 6 and len(recorded["perturbation"]) == 3
    assert len(recorded["lambda_vd"]) == 3 * flags[0] and len(recorded["lambda_tn"]) == 3 * flags[1]
    for i in range(3):  # y = r + gamma (1 - done) V*(o'), V* from the target networks' candidates
        target = batch.rewards + args.gamma * (1.0 - batch.dones) * recorded["next_value"][i]
        torch.testing.assert_close(recorded["target"][2 * i], target)
        expected = torch.ones(2, 64)
        for name, on in zip(("lambda_vd", "lambda_tn"), flags):
            if on:
                assert not torch.allclose(recorded[name][i], torch.ones(2, 64))  # a weight that does something
                expected = expected * recorded[name][i]
        for weight in (recorded["td"][2 * i], recorded["td"][2 * i + 1], recorded["perturbation"][i]):
            torch.testing.assert_close(torch.as_tensor(weight).expand(2, 64), expected)
    assert all(torch.isfinite(value).all() for value in metrics.values())


def test_bcq_ma_beats_behaviour_cloning_on_toy_task():
    """The one-step toy of test_omiga: BCQ picks the best of n perturbed behaviour samples, so it moves towards
    a* = (0.6, -0.6) while staying near the data, where BC stays at the behaviour mean."""
    torch.manual_seed(0)
    dataset, best = toy_dataset()
    args = small_args(hidden_dim=64, q_lr=3e-3, perturbation_lr=3e-3, vae_lr=3e-3)  # VAE: 32 hidden units
    agents = bcq_ma.Agents(2, dataset.obs_dim, 1, 1, args)
    optimizers = bcq_ma.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        bcq_ma.update(agents, optimizers, dataset.sample(128, generator), args)
    returns = [toy_return(agents.policy, dataset, best) for _ in range(20)]
    bcq_return, bc_return = sum(returns) / len(returns), behaviour_cloning_return(dataset, best, 200)
    assert bc_return < -0.5
    assert bcq_return > bc_return + 0.3, (bcq_return, bc_return)



def test_smoke_run_of_mabcq_writes_logs_checkpoint_and_final_line(tiny_hopper_dir, tmp_path):
    run = smoke_run("bcq_ma.py", tiny_hopper_dir, tmp_path, "--value-deviation", "--transition-normalization",
                    "--hidden-dim", "64", "--vae-hidden-dim", "64")
    assert {"losses/critic", "losses/perturbation", "losses/vae", "losses/transition_vae", "values/lambda_vd",
            "values/lambda_tn", "agents/lambda_vd_0"} <= run.scalars
    assert set(run.checkpoint["optimizers"]) == {"vae", "critic", "perturbation"}
    assert run.args["value_deviation"] and run.args["transition_normalization"]
    assert any(key.startswith("transition_vae.") for key in run.checkpoint["agents"])
    assert {"values/lambda_vd_std", "values/lambda_tn_std"} <= run.scalars
    measured = bcq_ma_values.measure(run.run_dir, 64, tiny_hopper_dir)
    again = bcq_ma_values.measure(run.run_dir, 64, tiny_hopper_dir)  # a fixed sample and fixed latents
    assert all(torch.equal(measured[key], again[key]) for key in ("next_value", "lambda_vd", "lambda_tn"))
    assert measured["flags"] == "vd tn" and measured["next_value"].shape == (3, 64)
    assert (measured["lambda_vd"] - 1.0).abs().max() <= run.args["optimism"] + 1e-6
    assert measured["lambda_tn"].log().abs().max() <= math.log(run.args["tn_max"]) + 1e-6
    assert len(bcq_ma_values.table_row(measured)) == 6


def test_td_fixed_point_of_a_multi_step_chain_with_a_terminal_state():
    """test_cql_ma's chain (gamma 0.9, rewards independent of actions, B terminal): each agent's twin critics reach
    Q_i = 1 / (1 - 0.9) = 10 at A, 2 at B (a backup from B would give 20) and 0.5 + 0.9 x 10 = 9.5 at C (within 0.01
    here; asserted to 0.2)."""
    torch.manual_seed(0)
    args = small_args(gamma=0.9, tau=0.1, q_lr=3e-3)
    agents = bcq_ma.Agents(2, 3, 1, 3, args)
    optimizers = bcq_ma.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(800):
        bcq_ma.update(agents, optimizers, chain_batch(64, generator), args)
    actions = torch.rand(2, 300, 1, generator=generator) * 2.0 - 1.0
    with torch.no_grad():
        values = torch.stack([torch.stack(agents.critic(torch.eye(3)[state].expand(2, 300, -1), actions)).mean(-1)
                              for state in range(3)], -1)  # [twin, agent, state]
    torch.testing.assert_close(values, torch.tensor([10.0, 2.0, 9.5]).expand(2, 2, 3), atol=0.2, rtol=0)


def test_perturbation_steps_raise_the_critics_value_of_the_perturbed_samples():
    """L_xi = -E[Q_1(o, a + xi(o, a))] over the VAE's samples a: descending it moves xi towards higher Q_1, within
    [-Phi, Phi]. To first order the best xi gains Phi |dQ_1/da|_1 per sample; 50 Adam steps reach over half of it (a
    sign error moves xi the other way, below the start)."""
    torch.manual_seed(0)
    args = small_args()
    agents = bcq_ma.Agents(2, 3, 2, 3, args)
    obs = torch.randn(2, 256, 3)
    with torch.no_grad():
        sampled = agents.vae.decode(obs)

    def perturbed_value() -> torch.Tensor:
        return agents.critic.q1(obs, agents.perturbation(obs, sampled))

    actions = sampled.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(agents.critic.q1(obs, actions).sum(), actions)
    with torch.no_grad():
        before, unperturbed = perturbed_value().mean(), agents.critic.q1(obs, sampled).mean()
    best_gain = (args.phi * slope.abs().sum(-1)).mean()
    optimizer = torch.optim.Adam(agents.perturbation.parameters(), lr=1e-2)
    for _ in range(50):
        bcq_ma.gradient_step(optimizer, bcq_ma.perturbation_loss(perturbed_value(), 1.0))
    with torch.no_grad():
        after = perturbed_value().mean()
    assert after - unperturbed > 0.5 * best_gain > 0, (after - unperturbed, best_gain, before - unperturbed)
