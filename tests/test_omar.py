"""OMAR: the sampling optimiser against known maxima, the actor loss's gradient, the choice between the optimiser's and
the policy's action, the per-agent TD fixed point of a multi-step chain, conservatism off the data, a toy task whose
local optimum traps the policy gradient and a smoke run."""

import math

import torch

import omar
from common.datasets import Batch
from conftest import smoke_run
from test_cql_ma import chain_batch, narrow_data_batch

CURVATURES = torch.tensor([1.0, 3.0, 0.5])  # one concave quadratic per agent


def quadratic_q(maxima: torch.Tensor):
    """Q_i(a) = -c_i ||a - a*_i(b)||^2 for every agent i and sample b: maxima [n, B, d]; q_fn maps [n, M, B, d] to
    [n, M, B], as the critic does in omar.update. Counts its calls in `q_fn.calls`."""
    def q_fn(actions: torch.Tensor) -> torch.Tensor:
        q_fn.calls += 1
        return -CURVATURES[:, None, None] * (actions - maxima[:, None]).pow(2).sum(-1)

    q_fn.calls = 0
    return q_fn


def test_sampling_optimiser_finds_each_agents_maximiser_with_one_batched_call_per_iteration():
    torch.manual_seed(0)
    n_agents, batch_size, act_dim, iters = 3, 64, 2, 5
    maxima = torch.rand(n_agents, batch_size, act_dim) * 1.6 - 0.8  # different for every agent and sample
    q_fn = quadratic_q(maxima)
    start = torch.zeros(n_agents, batch_size, act_dim)
    actions, values = omar.sampling_optimiser(q_fn, start, torch.full_like(start, 2.0), iters, 200, 20)
    assert q_fn.calls == iters  # every agent and sample in one call per iteration: no loop over agents or samples
    torch.testing.assert_close(actions, maxima, atol=0.02, rtol=0)
    torch.testing.assert_close(values, quadratic_q(maxima)(actions[:, None])[:, 0])  # the value of the action returned
    # The paper's settings (2 iterations, 20 samples, 5 elites) are coarse but still climb: far better than the start.
    actions, _ = omar.sampling_optimiser(q_fn, start, torch.full_like(start, 2.0), 2, 20, 5)
    assert (actions - maxima).norm(dim=-1).mean() < 0.5 * (start - maxima).norm(dim=-1).mean()


def test_sampling_optimiser_returns_the_best_action_of_every_iteration():
    """The elites of an iteration compete with the next one's samples, so the action returned is the best of all the
    optimiser evaluated, not only of its last draw (the paper's settings: 2 iterations, 20 samples, 5 elites)."""
    torch.manual_seed(2)
    maxima = torch.rand(3, 256, 2) * 1.6 - 0.8
    q_fn, seen = quadratic_q(maxima), []
    recording = lambda actions: seen.append(q_fn(actions)) or seen[-1]  # noqa: E731
    start = torch.zeros(3, 256, 2)
    _, values = omar.sampling_optimiser(recording, start, torch.full_like(start, 2.0), 2, 20, 5)
    best_seen = torch.cat(seen, 1).max(1).values
    torch.testing.assert_close(values, best_seen)
    assert (seen[1].max(1).values < best_seen).any()  # the last draw alone would have lost some


def test_sampling_optimiser_from_the_policy_action_refines_it():
    """Started at a point near the maximum with a small spread (--omar-policy-mean), the optimiser's result is at
    least as good as the start, whose neighbourhood it searches."""
    torch.manual_seed(1)
    maxima = torch.rand(3, 32, 2) * 1.6 - 0.8
    q_fn = quadratic_q(maxima)
    start = (maxima + 0.1).clamp(-1.0, 1.0)
    actions, values = omar.sampling_optimiser(q_fn, start, torch.full_like(start, 0.1), 3, 50, 10)
    assert (values >= q_fn(start[:, None])[:, 0]).float().mean() > 0.95
    assert (actions - maxima).norm(dim=-1).max() < 0.05


def test_rectified_action_is_the_better_of_the_optimisers_and_the_policys():
    policy_actions, sampled_actions = torch.zeros(2, 3, 1), torch.ones(2, 3, 1)
    policy_q = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    sampled_q = torch.tensor([[2.0, 2.0, 1.0], [1.0, -1.0, 0.5]])
    target = omar.rectified_actions(policy_actions, policy_q, sampled_actions, sampled_q)
    torch.testing.assert_close(target[..., 0], torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]))


def test_actor_loss_gradient_pulls_the_policy_towards_the_optimisers_action():
    """dL/dpi_i = (2 omar_coe (pi_i - â_i) + 2 action_l2 pi_i) / (d B) - (1 - omar_coe) dQ_i/dpi_i / B, per agent."""
    torch.manual_seed(0)
    n_agents, batch_size, act_dim, coe, l2 = 3, 5, 2, 0.9, 1e-3
    actions = (torch.rand(n_agents, batch_size, act_dim) * 2.0 - 1.0).requires_grad_()
    target = torch.rand(n_agents, batch_size, act_dim) * 2.0 - 1.0
    slope = torch.randn(n_agents, 1, act_dim)
    q = (slope * actions).sum(-1)  # a linear Q: dQ/da = slope
    loss = omar.policy_loss(actions, q, target, coe, l2)
    (gradient,) = torch.autograd.grad(loss, actions)
    with torch.no_grad():
        exact = (2 * coe * (actions - target) + 2 * l2 * actions) / (act_dim * batch_size) \
            - (1 - coe) * slope.expand_as(actions) / batch_size
    torch.testing.assert_close(gradient, exact)
    # With the Q term off, a descent step moves every agent's action towards â.
    (pure,) = torch.autograd.grad(omar.policy_loss(actions, torch.zeros(n_agents, batch_size), target, 1.0, 0.0),
                                  actions)
    assert ((-pure * (target - actions.detach())).sum(-1) > 0).all()


def test_actor_step_moves_every_agents_policy_towards_the_optimisers_action():
    torch.manual_seed(0)
    actor = omar.AgentActor(3, 4, 2, 32)
    optimizer = torch.optim.Adam(actor.parameters(), lr=1e-2)
    obs, target = torch.randn(3, 16, 4), torch.rand(3, 16, 2) * 1.6 - 0.8
    before = (actor.act(obs) - target).pow(2).mean((1, 2))
    for _ in range(50):
        actions = actor.act(obs)
        omar.clipped_step(optimizer, omar.policy_loss(actions, torch.zeros(3, 16), target, 1.0, 0.0), 0.5)
    after = (actor.act(obs) - target).pow(2).mean((1, 2))
    assert (after < 0.2 * before).all(), (before, after)


def per_agent_q(agents: omar.Agents, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Both critics of every agent: [2, n, B]."""
    with torch.no_grad():
        return torch.stack([critic(obs, actions) for critic in agents.q])


def test_td_fixed_point_of_a_multi_step_chain_for_every_agent_and_both_critics():
    """test_cql_ma's chain, gamma = 0.9, rewards independent of actions: each agent's Q_i(A) = 10, Q_i(B) = 2,
    Q_i(C) = 9.5 for every action, in both twin critics. The penalty is off: this checks the per-agent backup, the
    min over the target critics, targets, discount and dones."""
    torch.manual_seed(0)
    args = omar.Args(gamma=0.9, tau=0.1, cql_alpha=0.0, cql_samples=2, omar_samples=4, omar_elites=2, hidden_dim=32,
                     q_lr=3e-3, policy_lr=1e-3, grad_clip=10.0)
    agents = omar.Agents(2, 3, 1, 3, args)
    optimizers = omar.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(800):
        omar.update(agents, optimizers, chain_batch(64, generator), args)
    actions = torch.rand(2, 300, 1, generator=generator) * 2.0 - 1.0
    values = torch.stack([per_agent_q(agents, torch.eye(3)[state].expand(2, 300, -1), actions).mean(-1)
                          for state in range(3)], -1)  # [2 critics, 2 agents, 3 states]
    torch.testing.assert_close(values, torch.tensor([10.0, 2.0, 9.5]).expand(2, 2, 3), atol=0.2, rtol=0)


def q_on_and_off_data(cql_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every agent's Q_1 at the data (action 0) and off it (-0.9 and 0.9) after training on test_cql_ma's narrow
    data (reward 0, behaviour actions near 0): [n] each."""
    torch.manual_seed(0)
    args = omar.Args(cql_alpha=cql_alpha, hidden_dim=32, q_lr=3e-3, policy_lr=1e-3, grad_clip=10.0)
    agents = omar.Agents(2, 1, 1, 1, args)
    optimizers = omar.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        omar.update(agents, optimizers, narrow_data_batch(128, generator), args)
    obs = torch.ones(2, 1, 1)
    on_data = per_agent_q(agents, obs, torch.zeros(2, 1, 1))[0, :, 0]
    off_data = torch.stack([per_agent_q(agents, obs, torch.full((2, 1, 1), a))[0, :, 0] for a in (-0.9, 0.9)]).mean(0)
    return on_data, off_data


def test_penalty_lowers_each_agents_q_on_unseen_actions_and_keeps_it_on_dataset_actions():
    plain_on, plain_off = q_on_and_off_data(cql_alpha=0.0)
    conservative_on, conservative_off = q_on_and_off_data(cql_alpha=1.0)
    assert (plain_on.abs() < 0.2).all() and (conservative_on > -0.2).all()  # the TD target is 0 on the data
    assert (conservative_off < plain_off - 1.0).all(), (conservative_off, plain_off)
    assert (conservative_off < conservative_on - 1.0).all()


def two_peaks(actions: torch.Tensor) -> torch.Tensor:
    """A wide low peak at -0.5 (value 0.5) whose basin holds 0, and a narrow high one at 0.6 (value 1.5)."""
    return 0.5 * torch.exp(-((actions + 0.5) / 0.5).pow(2)) + 1.5 * torch.exp(-((actions - 0.6) / 0.15).pow(2))


def two_peaks_batch(batch_size: int, generator: torch.Generator) -> Batch:
    """One-step task for two agents with 1-D actions uniform on [-1, 1]: r = f(a_0) + f(a_1), f = two_peaks."""
    actions = torch.rand(2, batch_size, 1, generator=generator) * 2.0 - 1.0
    ones = torch.ones(batch_size, 1)
    return Batch(obs=ones.expand(2, -1, -1), actions=actions, rewards=two_peaks(actions[..., 0]).sum(0),
                 next_obs=ones.expand(2, -1, -1), dones=torch.ones(batch_size), states=ones, next_states=ones)


def final_actions(omar_coe: float) -> torch.Tensor:
    torch.manual_seed(0)
    # Per-agent weights: with this seed the initial policies sit near 0, in the local optimum's basin (the premise).
    args = omar.Args(omar_coe=omar_coe, cql_alpha=0.0, hidden_dim=64, q_lr=3e-3, policy_lr=3e-3, per_agent_networks=True)
    agents = omar.Agents(2, 1, 1, 1, args)
    optimizers = omar.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        omar.update(agents, optimizers, two_peaks_batch(128, generator), args)
    with torch.no_grad():
        return agents.policy.act(torch.ones(2, 1, 1)).flatten()


def test_rectification_reaches_the_global_optimum_where_the_policy_gradient_stays_in_the_local_one():
    """The paper's argument on a toy with a known answer: each agent's best action is 0.6, but the policy starts near 0,
    in the basin of the local optimum -0.5. The policy gradient alone (omar_coe = 0, CQL's actor) climbs there;
    OMAR's zeroth-order target finds the global optimum."""
    gradient_only, rectified = final_actions(omar_coe=0.0), final_actions(omar_coe=0.9)
    assert (gradient_only - (-0.5)).abs().max() < 0.15, gradient_only
    assert (rectified - 0.6).abs().max() < 0.1, rectified



def test_smoke_run_writes_logs_checkpoint_and_final_line(tiny_hopper_dir, tmp_path):
    run = smoke_run("omar.py", tiny_hopper_dir, tmp_path)
    assert {"losses/q", "losses/cql_penalty", "losses/policy", "losses/rectification", "values/q_sampled_gain",
            "agents/sampled_target_share_0", "agents/sampled_target_share_2"} <= run.scalars
    assert set(run.checkpoint["optimizers"]) == {"q", "policy"}
    assert math.isfinite(float(run.stdout.rsplit("final return: ", 1)[1].split()[0]))


def test_bootstrap_is_the_smaller_target_critic_at_the_target_policys_action():
    torch.manual_seed(0)
    agents = omar.Agents(3, 4, 2, 1, omar.Args(hidden_dim=16, per_agent_networks=True))
    with torch.no_grad():
        agents.q_target[1].net[-1].bias.add_(torch.tensor([1.0, -1.0, 0.0])[:, None, None])  # apart, both ways
        agents.policy_target.net[-1].bias.add_(0.5)  # the target policy differs from the policy
    next_obs = torch.randn(3, 8, 4)
    with torch.no_grad():
        actions = agents.policy_target.act(next_obs)
        both = torch.stack([critic(next_obs, actions) for critic in agents.q_target])
    torch.testing.assert_close(omar.next_value(agents, next_obs), both.min(0).values)


def test_log_integral_divides_by_each_proposals_density():
    """CQL(H)'s log int exp(Q(a)) da (Kumar et al., Appendix F) from 20,000 samples of one proposal, against the exact
    integral: Q(a) = -a^2 with a uniform proposal on [-1, 1] (log sqrt(pi) erf(1)) and with N(0, 1) over the real line
    (log sqrt(pi)). Without the division by the density the estimates are off by log 2 and by about 1.1."""
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(20_000, generator=generator) * 2.0 - 1.0
    gaussian = torch.randn(20_000, generator=generator)
    for samples, log_density, exact in (
            (uniform, torch.full_like(uniform, -math.log(2.0)), math.log(math.sqrt(math.pi) * math.erf(1.0))),
            (gaussian, -0.5 * gaussian.pow(2) - 0.5 * math.log(2 * math.pi), math.log(math.sqrt(math.pi)))):
        estimate = omar.log_integral_exp(-samples.pow(2), log_density)
        assert abs(estimate.item() - exact) < 0.02, (estimate, exact)
