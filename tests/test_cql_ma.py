"""MA-CQL: the importance-sampled log-integral, the penalty's gradient, the TD fixed point of a multi-step chain,
conservatism off the data, learning on a toy task and a smoke run."""

import math

import torch

import cql_ma
from common.datasets import Batch
from conftest import smoke_run
from test_omiga import behaviour_cloning_return, toy_dataset, toy_return

GRID = torch.linspace(-1.0, 1.0, 20_001)  # for numerical integrals over a 1-D action in [-1, 1]



def peaked_q(actions: torch.Tensor) -> torch.Tensor:
    return 2.0 - 6.0 * (actions - 0.3).pow(2)


def proposal_samples(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D actions and their log-densities from the two proposals: uniform on [-1, 1] and a tanh-Gaussian policy."""
    uniform = torch.rand(count) * 2.0 - 1.0
    mean, log_std = torch.full((count, 1), 0.2), torch.full((count, 1), math.log(0.5))
    policy, policy_log_density = cql_ma.sample_actions(mean, log_std)
    return uniform, torch.full((count,), -math.log(2.0)), policy.squeeze(-1), policy_log_density


def test_log_integral_estimate_matches_numerical_integral_on_a_1d_action():
    torch.manual_seed(0)
    exact = torch.log(torch.trapezoid(torch.exp(peaked_q(GRID)), GRID))
    uniform, uniform_log_density, policy, policy_log_density = proposal_samples(50_000)
    from_uniform = cql_ma.log_integral_exp(peaked_q(uniform), uniform_log_density)
    # The policy proposal alone checks the tanh-Gaussian log-density of sample_actions (Jacobian included).
    from_policy = cql_ma.log_integral_exp(peaked_q(policy), policy_log_density)
    both = cql_ma.log_integral_exp(peaked_q(torch.cat([uniform, policy])),
                                   torch.cat([uniform_log_density, policy_log_density]))
    for estimate in (from_uniform, from_policy, both):
        assert abs(estimate - exact) < 0.02, (estimate, exact)


def test_penalty_gradient_pushes_q_up_on_the_dataset_action_and_down_elsewhere():
    """Known critic Q_theta(a) = sum_j theta_j phi_j(a) with Gaussian bumps phi_j: the exact gradient of
    R = log int exp(Q) da - Q(a_D) is E_{p ~ exp Q}[phi_j] - phi_j(a_D); the sampled penalty's must match it."""
    torch.manual_seed(0)
    centres, data_action = torch.tensor([-0.8, -0.3, 0.2, 0.5, 0.9]), torch.tensor([0.5])

    def features(actions: torch.Tensor) -> torch.Tensor:
        return torch.exp(-((actions[:, None] - centres) / 0.15).pow(2))

    theta = torch.tensor([0.5, -0.2, 0.3, 0.1, 0.4], requires_grad=True)
    uniform, uniform_log_density, policy, policy_log_density = proposal_samples(50_000)
    samples = torch.cat([uniform, policy])
    penalty = cql_ma.conservative_penalty((features(samples) @ theta)[:, None],
                                          torch.cat([uniform_log_density, policy_log_density])[:, None],
                                          features(data_action) @ theta)
    (gradient,) = torch.autograd.grad(penalty, theta)
    with torch.no_grad():
        density = torch.exp(features(GRID) @ theta)
        normaliser = torch.trapezoid(density, GRID)
        expected_features = torch.trapezoid(density[:, None] * features(GRID), GRID, dim=0) / normaliser
        exact = expected_features - features(data_action)[0]
    torch.testing.assert_close(gradient, exact, atol=0.01, rtol=0)
    data_bump = 3
    assert gradient[data_bump] < -0.5  # descent raises Q at the dataset action ...
    assert (gradient[torch.arange(5) != data_bump] > 0.05).all()  # ... and lowers it away from the data


def chain_batch(batch_size: int, generator: torch.Generator) -> Batch:
    """States A (0), B (1), C (2), one-hot for the state and both agents, actions uniform and irrelevant to rewards:
    A -> A with r = 1 (not terminal), C -> A with r = 0.5 (not terminal), B terminal with r = 2."""
    state = torch.randint(3, (batch_size,), generator=generator)
    next_state = torch.where(state == 1, 1, 0)
    rewards = torch.tensor([1.0, 2.0, 0.5])[state]
    one_hot, next_one_hot = torch.eye(3)[state], torch.eye(3)[next_state]
    actions = torch.rand(2, batch_size, 1, generator=generator) * 2.0 - 1.0
    return Batch(obs=one_hot.expand(2, -1, -1), actions=actions, rewards=rewards,
                 next_obs=next_one_hot.expand(2, -1, -1), dones=(state == 1).float(), states=one_hot,
                 next_states=next_one_hot)


def mixed_q(agents: cql_ma.Agents, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Q_tot(s, a) for one-hot states [B, 3] (every agent observes the state) and joint actions [n, B, 1]."""
    with torch.no_grad():
        w, b = agents.mixer(states)
        return cql_ma.mix(w, agents.q(states.expand(actions.shape[0], -1, -1), actions), b)


def chain_values(script=cql_ma) -> torch.Tensor:
    """Q_tot at A, B, C (mean over random joint actions) after `script` (cql_ma or a diff of it with the same Args,
    Agents and update) trained on chain_batch with gamma 0.9 and the penalty off."""
    torch.manual_seed(0)
    args = script.Args(gamma=0.9, tau=0.1, cql_alpha=0.0, cql_samples=2, hidden_dim=32, mixer_hidden_dim=8, q_lr=3e-3,
                       policy_lr=1e-3)
    agents = script.Agents(2, 3, 1, 3, args)
    optimizers = script.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(800):
        script.update(agents, optimizers, chain_batch(64, generator), args)
    actions = torch.rand(2, 300, 1, generator=generator) * 2.0 - 1.0
    return torch.stack([mixed_q(agents, torch.eye(3)[state].expand(300, -1), actions).mean() for state in range(3)])


def test_td_fixed_point_of_a_multi_step_chain():
    """gamma = 0.9, rewards independent of actions: Q_tot(A) = 1 / (1 - 0.9) = 10, Q_tot(C) = 0.5 + 0.9 * 10 = 9.5 and
    Q_tot(B) = 2 for every joint action (B is terminal: a backup without (1 - done) would make it 20). The penalty is
    off: this checks the backup, targets, discount and dones."""
    torch.testing.assert_close(chain_values(), torch.tensor([10.0, 2.0, 9.5]), atol=0.15, rtol=0)


def narrow_data_batch(batch_size: int, generator: torch.Generator) -> Batch:
    """One-step task, reward 0 everywhere, behaviour actions near 0 (std 0.1): every action beyond +-0.5 is unseen."""
    actions = (0.1 * torch.randn(2, batch_size, 1, generator=generator)).clamp(-0.99, 0.99)
    ones, zeros = torch.ones(batch_size, 1), torch.zeros(batch_size)
    return Batch(obs=ones.expand(2, -1, -1), actions=actions, rewards=zeros, next_obs=ones.expand(2, -1, -1),
                 dones=torch.ones(batch_size), states=ones, next_states=ones)


def q_on_and_off_data(cql_alpha: float, script=cql_ma) -> tuple[float, float]:
    """Q_tot at the data (both agents at 0) and off it (both at -0.9 or 0.9) after `script` trained on
    narrow_data_batch (cql_ma or a diff of it with the same Args, Agents and update)."""
    torch.manual_seed(0)
    args = script.Args(cql_alpha=cql_alpha, hidden_dim=32, mixer_hidden_dim=8, q_lr=3e-3, policy_lr=1e-3)
    agents = script.Agents(2, 1, 1, 1, args)
    optimizers = script.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        script.update(agents, optimizers, narrow_data_batch(128, generator), args)
    state = torch.ones(1, 1)
    on_data = mixed_q(agents, state, torch.zeros(2, 1, 1))
    off_data = torch.stack([mixed_q(agents, state, torch.full((2, 1, 1), a)) for a in (-0.9, 0.9)]).mean()
    return on_data.item(), off_data.item()


def test_penalty_lowers_q_on_unseen_actions_and_keeps_it_on_dataset_actions():
    plain_on, plain_off = q_on_and_off_data(cql_alpha=0.0)
    conservative_on, conservative_off = q_on_and_off_data(cql_alpha=1.0)
    assert abs(plain_on) < 0.2 and conservative_on > -0.2  # the TD target is 0 on the data either way
    assert conservative_off < plain_off - 1.0, (conservative_off, plain_off)
    assert conservative_off < conservative_on - 1.0


def test_cql_ma_beats_behaviour_cloning_on_toy_task():
    torch.manual_seed(0)
    dataset, best = toy_dataset()
    args = cql_ma.Args(cql_alpha=1.0, hidden_dim=64, mixer_hidden_dim=16, q_lr=3e-3, policy_lr=3e-3)
    agents = cql_ma.Agents(2, dataset.obs_dim, 1, 1, args)
    optimizers = cql_ma.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        cql_ma.update(agents, optimizers, dataset.sample(128, generator), args)
    cql_return, bc_return = toy_return(agents.policy, dataset, best), behaviour_cloning_return(dataset, best, 500)
    # BC recovers the behaviour mean (0, 0): return about -0.72; the best joint action (0.6, -0.6) is in the data.
    assert bc_return < -0.5
    assert cql_return > bc_return + 0.3, (cql_return, bc_return)



def test_smoke_run_writes_logs_checkpoint_and_final_line(tiny_hopper_dir, tmp_path):
    run = smoke_run("cql_ma.py", tiny_hopper_dir, tmp_path)
    assert {"losses/q", "losses/cql_penalty", "losses/policy", "values/entropy_alpha"} <= run.scalars
    assert set(run.checkpoint["optimizers"]) == {"q", "policy", "entropy"}
