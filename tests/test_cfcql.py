"""CFCQL: the counterfactual penalty against numerical integrals and against MA-CQL's joint penalty, the agent
weights against a closed-form KL, the TD fixed point of a multi-step chain with a terminal state, learning on a toy
task and a smoke run."""

import math

import torch

import cfcql
import cql_ma
from conftest import smoke_run
from test_cql_ma import chain_values, q_on_and_off_data
from test_omiga import behaviour_cloning_return, toy_dataset, toy_return

GRID = torch.linspace(-1.0, 1.0, 20_001)  # for numerical integrals over a 1-D action in [-1, 1]
DATA_ACTIONS = torch.tensor([0.4, -0.1])  # the dataset's joint action of the two agents



def local_values(agent: int, actions: torch.Tensor) -> torch.Tensor:
    """Two agents' local values of 1-D actions, one peaked and one tilted: Q_tot(a) = f_0(a_0) + f_1(a_1)."""
    return 2.0 - 6.0 * (actions - 0.3).pow(2) if agent == 0 else 1.5 * actions


def exact_counterfactual_terms() -> torch.Tensor:
    """R_i = log int exp(f_i(a_i)) da_i - f_i(a_i^D): the other agent's value cancels in the counterfactual penalty."""
    log_integrals = [torch.log(torch.trapezoid(torch.exp(local_values(i, GRID)), GRID)) for i in range(2)]
    return torch.stack([log_integrals[i] - local_values(i, DATA_ACTIONS[i]) for i in range(2)])


def test_counterfactual_penalty_matches_numerical_integrals_and_is_the_joint_penalty_over_n():
    torch.manual_seed(0)
    count = 50_000
    data_q_tot = local_values(0, DATA_ACTIONS[0]) + local_values(1, DATA_ACTIONS[1])
    # Each agent's samples from both proposals, the other agent held at its dataset action: [S, n, B = 1].
    uniform = torch.rand(count, 2) * 2.0 - 1.0
    policy, policy_log_density = cql_ma.sample_actions(torch.full((count, 2, 1), 0.2),
                                                       torch.full((count, 2, 1), math.log(0.6)))
    samples = torch.cat([uniform, policy.squeeze(-1)])
    log_density = torch.cat([torch.full((count, 2), -math.log(2.0)), policy_log_density])
    cf_q_tot = torch.stack([local_values(0, samples[:, 0]) + local_values(1, DATA_ACTIONS[1]),
                            local_values(0, DATA_ACTIONS[0]) + local_values(1, samples[:, 1])], 1)
    halves = torch.full((2, 1), 0.5)
    penalty = cfcql.counterfactual_penalty(cf_q_tot[..., None], log_density[..., None], data_q_tot[None], halves)
    exact = exact_counterfactual_terms()
    assert abs(penalty - exact.mean()) < 0.02, (penalty, exact)
    # MA-CQL's penalty over the joint 2-D action: log int exp(f_0 + f_1) = sum of the 1-D log-integrals, so it is
    # n times CFCQL's with equal weights.
    joint_q_tot = local_values(0, samples[:, 0]) + local_values(1, samples[:, 1])
    joint_log_density = log_density.sum(1)
    joint = cql_ma.conservative_penalty(joint_q_tot[:, None], joint_log_density[:, None], data_q_tot[None])
    assert abs(joint - 2 * penalty) < 0.04, (joint, penalty)


def test_agent_weights_follow_the_kl_of_each_agents_counterfactual_distribution():
    """beta_i uniform for both agents; agent 0's counterfactual Q is flat (mu_0 = beta_0, KL 0), agent 1's is peaked
    (KL(mu_1 || U) = int mu_1 log mu_1 + log 2): lambda = softmax(tau (0, KL_1)), and uniform at tau = 0."""
    torch.manual_seed(0)
    count = 100_000
    samples = torch.rand(count) * 2.0 - 1.0
    log_density = torch.full((count, 2, 1), -math.log(2.0))
    cf_q_tot = torch.stack([torch.zeros(count), local_values(0, samples)], 1)[..., None]
    behaviour_log_prob = torch.full((count, 2, 1), -math.log(2.0))
    with torch.no_grad():
        mu = torch.exp(local_values(0, GRID))
        mu = mu / torch.trapezoid(mu, GRID)
        kl_exact = torch.trapezoid(mu * torch.log(mu), GRID) + math.log(2.0)
    tau = 2.0
    weights = cfcql.agent_weights(cf_q_tot, log_density, behaviour_log_prob, tau).squeeze(-1)
    expected = torch.softmax(tau * torch.stack([torch.zeros(()), kl_exact]), 0)
    torch.testing.assert_close(weights, expected, atol=0.01, rtol=0)
    assert weights[1] > weights[0] + 0.3  # the agent whose counterfactual actions stray from beta carries the penalty
    uniform = cfcql.agent_weights(cf_q_tot, log_density, None, 0.0).squeeze(-1)
    torch.testing.assert_close(uniform, torch.full((2,), 0.5))


def test_counterfactual_penalty_lowers_q_on_unseen_actions_and_keeps_it_on_dataset_actions():
    plain_on, plain_off = q_on_and_off_data(cql_alpha=0.0, script=cfcql)
    conservative_on, conservative_off = q_on_and_off_data(cql_alpha=1.0, script=cfcql)
    assert abs(plain_on) < 0.2 and conservative_on > -0.2  # the TD target is 0 on the data either way
    assert conservative_off < plain_off - 1.0, (conservative_off, plain_off)
    assert conservative_off < conservative_on - 1.0


def test_cfcql_with_agent_weights_beats_behaviour_cloning_on_toy_task():
    torch.manual_seed(0)
    dataset, best = toy_dataset()
    args = cfcql.Args(cql_alpha=1.0, cf_tau=1.0, hidden_dim=64, mixer_hidden_dim=16, q_lr=3e-3, policy_lr=3e-3)
    agents = cfcql.Agents(2, dataset.obs_dim, 1, 1, args)
    optimizers = cfcql.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        metrics = cfcql.update(agents, optimizers, dataset.sample(128, generator), args)
    cfcql_return, bc_return = toy_return(agents.policy, dataset, best), behaviour_cloning_return(dataset, best, 500)
    # BC recovers the behaviour mean (0, 0): return about -0.72; the best joint action (0.6, -0.6) is in the data.
    assert bc_return < -0.5
    assert cfcql_return > bc_return + 0.3, (cfcql_return, bc_return)
    torch.testing.assert_close(metrics["agents/cf_weight"].sum(), torch.tensor(1.0))



def test_smoke_run_writes_logs_checkpoint_and_final_line(tiny_hopper_dir, tmp_path):
    run = smoke_run("cfcql.py", tiny_hopper_dir, tmp_path, "--cf-tau", "1.0")
    assert {"losses/q", "losses/cql_penalty", "agents/cf_weight_0", "agents/cf_weight_2"} <= run.scalars
    assert set(run.checkpoint["optimizers"]) == {"q", "policy", "entropy", "behaviour"}


def test_counterfactual_q_tot_equals_mixing_with_one_agents_action_swapped():
    torch.manual_seed(0)
    n_agents, samples, batch_size, obs_dim, act_dim, state_dim = 3, 4, 5, 6, 2, 7
    critic, mixer = cfcql.AgentQ(n_agents, obs_dim, act_dim, 16), cfcql.Mixer(state_dim, n_agents, 8)
    obs, states = torch.randn(n_agents, batch_size, obs_dim), torch.randn(batch_size, state_dim)
    actions = torch.rand(n_agents, 1 + samples, batch_size, act_dim) * 2.0 - 1.0  # index 0: the dataset's
    with torch.no_grad():
        q = torch.stack([critic(obs, actions[:, k]) for k in range(1 + samples)], 1)
        w, b = mixer(states)
        q_tot, cf_q_tot = cfcql.counterfactual_q_tot(q, w, b)
        torch.testing.assert_close(q_tot, cfcql.mix(w, critic(obs, actions[:, 0]), b))
        for k in range(samples):
            for agent in range(n_agents):
                swapped = actions[:, 0].clone()
                swapped[agent] = actions[agent, 1 + k]
                torch.testing.assert_close(cf_q_tot[k, agent], cfcql.mix(w, critic(obs, swapped), b))


def test_td_fixed_point_of_a_multi_step_chain_with_a_terminal_state():
    """test_cql_ma's chain (gamma 0.9, B terminal): Q_tot = 10, 2, 9.5 at A, B, C with the penalty off."""
    torch.testing.assert_close(chain_values(cfcql), torch.tensor([10.0, 2.0, 9.5]), atol=0.15, rtol=0)
