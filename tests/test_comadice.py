"""ComaDICE: the f-divergence maths, the nu objective's convexity and minimiser, initial-state sampling, the values of a
multi-step chain against the exact dual optimum, learning on a toy task, and a smoke run."""


import numpy as np
import pytest
import torch

import comadice
from common.datasets import Dataset
from conftest import CHAIN_GAMMA, CHAIN_JOINT, chain_dataset, chain_joint_batch, smoke_run
from test_omiga import behaviour_cloning_return, toy_dataset, toy_return

F_NAMES = list(comadice.F_DIVERGENCES)


@pytest.mark.parametrize("name", F_NAMES)
def test_conjugate_is_the_sup_over_t_and_its_slope_is_the_occupancy_ratio(name):
    """f*(y) = sup_{t>=0} {t y - f(t)} on a fine grid of t; d f*/dy = w* = max(0, f'^{-1}(y)) (Prop. 4.1)."""
    divergence = comadice.F_DIVERGENCES[name]
    y = torch.linspace(-3.0, 3.0, 61, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 12.0, 120_001, dtype=torch.float64)  # contains every maximiser, max(0, f'^{-1}(3)) <= 7.4
    grid_sup = (t[None, :] * y.detach()[:, None] - divergence.f(t)[None, :]).max(1).values
    conjugate = divergence.conjugate(y)
    torch.testing.assert_close(conjugate.detach(), grid_sup, atol=1e-6, rtol=0)
    (slope,) = torch.autograd.grad(conjugate.sum(), y)
    alpha = 2.0  # occupancy_ratio takes A_tot and alpha: y = A_tot / alpha
    torch.testing.assert_close(slope, comadice.occupancy_ratio(alpha * y.detach(), divergence, alpha))


@pytest.mark.parametrize("name", F_NAMES)
def test_prime_inverse_inverts_the_derivative_of_f(name):
    divergence = comadice.F_DIVERGENCES[name]
    t = torch.linspace(0.05, 5.0, 100, dtype=torch.float64, requires_grad=True)  # both sides of soft-chi2's t = 1
    (f_prime,) = torch.autograd.grad(divergence.f(t).sum(), t)
    torch.testing.assert_close(divergence.prime_inverse(f_prime), t.detach())
    y = torch.linspace(-0.9, 3.0, 40, dtype=torch.float64)  # where f'^{-1}(y) > 0 for every f, chi2 included
    t_of_y = divergence.prime_inverse(y).requires_grad_(True)
    (f_prime_of_t,) = torch.autograd.grad(divergence.f(t_of_y).sum(), t_of_y)
    torch.testing.assert_close(f_prime_of_t, y)


def largest_chord_gap(divergence: comadice.FDivergence, n_agents=3, size=64, initial_size=32) -> float:
    """max of L_nu((1 - lam) a + lam b) - ((1 - lam) L_nu(a) + lam L_nu(b)) over random problems, segments [a, b]
    of (nu, nu0) values and lam in [0, 1]; L_nu (Eq. 11) with fixed q and a linear mixer with non-negative weights."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    lambdas = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    gap = -np.inf
    for _ in range(10):
        q, b, b0 = randn(n_agents, size, scale=3.0), randn(size), randn(initial_size)
        w, w0 = (torch.rand(n_agents, k, generator=g, dtype=torch.float64) for k in (size, initial_size))

        def loss(nu, nu0):
            return comadice.nu_loss(comadice.mix(w0, nu0, b0), comadice.mix(w, q - nu, b), divergence, 1.0, 0.9)

        # scale 3 puts A_tot / alpha on both sides of the branch points of soft-chi2 (0) and chi2 (-1)
        nu_a, nu_b = randn(n_agents, size, scale=3.0), randn(n_agents, size, scale=3.0)
        nu0_a, nu0_b = randn(n_agents, initial_size, scale=3.0), randn(n_agents, initial_size, scale=3.0)
        along = torch.stack([loss((1 - lam) * nu_a + lam * nu_b, (1 - lam) * nu0_a + lam * nu0_b) for lam in lambdas])
        chord = (1 - lambdas) * loss(nu_a, nu0_a) + lambdas * loss(nu_b, nu0_b)
        gap = max(gap, (along - chord).max().item())
    return gap


@pytest.mark.parametrize("name", F_NAMES)
def test_nu_objective_is_convex_along_segments(name):
    """Theorem 4.2 for the linear non-negative mixer. A_tot is affine in nu here, so convexity rests on f*;
    the control with -f* in place of f* shows that the check can fail."""
    divergence = comadice.F_DIVERGENCES[name]
    assert largest_chord_gap(divergence) <= 1e-9
    negated = divergence._replace(conjugate=lambda y: -divergence.conjugate(y))
    assert largest_chord_gap(negated) > 1e-3


@pytest.mark.parametrize("name", F_NAMES)
def test_nu_gradient_is_that_of_the_dice_objective_when_q_fits_its_target(name):
    """With M_s[q - nu] + M_s[nu] = r + gamma (1 - done) M_s'[nu(o')] (Eq. 10 at its minimiser), the gradient of the
    implemented L_nu in nu(o) and nu(o') is that of Eq. 11 with Eq. 5's A_tot = r + gamma (1 - done) nu_tot(s') -
    nu_tot(s). The control without the next-state term (q held fixed) has no gradient in nu(o'), so the check can fail."""
    divergence, gamma, alpha = comadice.F_DIVERGENCES[name], 0.9, 2.0
    g = torch.Generator().manual_seed(1)
    n, size, initial_size = 2, 64, 16
    randn = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    w, next_w, w0 = (torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1 for k in (size, size, initial_size))
    b, next_b, b0 = randn(size), randn(size), randn(initial_size)
    rewards, dones = randn(size, scale=3.0), (torch.rand(size, generator=g) < 0.2).double()
    nu0 = randn(n, initial_size, scale=3.0)
    nu, next_nu = randn(n, size, scale=3.0).requires_grad_(), randn(n, size, scale=3.0).requires_grad_()

    def gradients(with_next_state_term: bool) -> tuple[torch.Tensor, torch.Tensor]:
        next_nu_tot = comadice.mix(next_w, next_nu, next_b)
        target = rewards + gamma * (1 - dones) * next_nu_tot.detach()
        q = ((target - 2 * b) / w.sum(0)).expand(n, size)  # a q with M_s[q - nu] + M_s[nu] = target
        advantage_tot = comadice.mix(w, q - nu, b)
        if with_next_state_term:
            advantage_tot = comadice.advantage_for_nu(advantage_tot, next_nu_tot, dones, gamma)
        loss = comadice.nu_loss(comadice.mix(w0, nu0, b0), advantage_tot, divergence, alpha, gamma)
        grads = torch.autograd.grad(loss, (nu, next_nu), allow_unused=True)
        return tuple(torch.zeros_like(x) if grad is None else grad for grad, x in zip(grads, (nu, next_nu)))

    exact_advantage = rewards + gamma * (1 - dones) * comadice.mix(next_w, next_nu, next_b) - comadice.mix(w, nu, b)
    exact = torch.autograd.grad(comadice.nu_loss(comadice.mix(w0, nu0, b0), exact_advantage, divergence, alpha, gamma),
                                (nu, next_nu))
    for implemented, reference in zip(gradients(True), exact):
        torch.testing.assert_close(implemented, reference, rtol=1e-12, atol=1e-14)
    held_fixed = gradients(False)
    torch.testing.assert_close(held_fixed[0], exact[0], rtol=1e-12, atol=1e-14)
    assert held_fixed[1].abs().max() == 0 and exact[1].abs().max() > 1e-3


def test_initial_states_are_drawn_from_episode_starts():
    """Three episodes of lengths 2, 3 and 4 (the first ends by termination, the second by a timeout)."""
    size = 9
    states = np.arange(size, dtype=np.float32)[:, None]
    terminals, timeouts = np.zeros(size, bool), np.zeros(size, bool)
    terminals[1], timeouts[4], terminals[8] = True, True, True
    obs = np.zeros((size, 2, 1), np.float32)
    arrays = dict(observations=obs, next_observations=obs, states=states, next_states=states,
                  actions=obs, rewards=np.zeros(size, np.float32), terminals=terminals, timeouts=timeouts)
    dataset = Dataset(arrays, dict(obs_mode="local"), "local", "cpu")
    initial_batch = comadice.sample_initial_states(dataset, 300, torch.Generator().manual_seed(0))
    drawn = initial_batch.states[:, 0].long()
    assert set(drawn.tolist()) == {0, 2, 5}
    assert initial_batch.obs.shape == (2, 300, dataset.obs_dim)


def exact_chain_nu(dataset: Dataset, divergence: comadice.FDivergence, alpha: float) -> torch.Tensor:
    """argmin over nu [4 joint states] of Eq. 11 with A = r + gamma nu(s') - nu(s), on the dataset's own transitions
    and episode starts: a 4-variable convex problem, solved in float64."""
    state, next_state, live = dataset.states.argmax(1), dataset.next_states.argmax(1), 1.0 - dataset.dones.double()
    initial = dataset.states[dataset.episode_starts].argmax(1)
    rewards = dataset.rewards.double()
    nu = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([nu], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        advantage = rewards + CHAIN_GAMMA * live * nu[next_state] - nu[state]
        loss = comadice.nu_loss(nu[initial], advantage, divergence, alpha, CHAIN_GAMMA)
        loss.backward()
        return loss

    optimizer.step(objective)
    return nu.detach()


def trained_chain_values(dataset: Dataset) -> tuple[comadice.Args, torch.Tensor, torch.Tensor]:
    """ComaDICE at alpha 1 trained on the chain for 3,000 minibatches of 128: nu_tot [4 joint states] and A_tot
    [16 joint (s, a)], iterates averaged over the last 1,000 updates (at lr 2e-3 a single iterate still moves by
    ~0.05)."""
    args = comadice.Args(alpha=1.0, gamma=CHAIN_GAMMA, tau=0.05, hidden_dim=64, mixer_hidden_dim=32, q_lr=2e-3,
                         nu_lr=2e-3)
    agents = comadice.Agents(2, dataset.obs_dim, 1, 4, args)
    optimizers = comadice.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    batch = chain_joint_batch(dataset)
    snapshots = []
    for step in range(1, 3001):
        comadice.update(agents, optimizers, dataset.sample(128, generator),
                        comadice.sample_initial_states(dataset, 128, generator), args)
        if step > 2000 and step % 100 == 0:
            with torch.no_grad():
                w, b = agents.mixer(batch.states)
                snapshots.append((comadice.mix(w, agents.nu(batch.obs), b)[::4],
                                  comadice.mix(w, agents.q(batch.obs, batch.actions) - agents.nu(batch.obs), b)))
    nu_tot, advantage_tot = (torch.stack(values).mean(0) for values in zip(*snapshots))
    return args, nu_tot, advantage_tot


def test_values_match_the_exact_dual_optimum_on_a_multi_step_chain():
    """gamma 0.8, no terminals, episodes of 10 rows for D0: the trained nu_tot(s) and A_tot(s, a) equal the minimiser
    nu* of Eq. 11 on the same data and r + gamma nu*(s') - nu*(s). Dropping the bootstrap term misses by far more."""
    torch.manual_seed(0)
    dataset = chain_dataset(episode_length=10)
    args, nu_tot, advantage_tot = trained_chain_values(dataset)
    nu_star = exact_chain_nu(dataset, comadice.F_DIVERGENCES[args.f_divergence], args.alpha)
    rewards = chain_joint_batch(dataset).rewards.double()
    next_state = torch.tensor([2 * a0 + a1 for _, _, a0, a1 in CHAIN_JOINT])
    expected_advantage = rewards + CHAIN_GAMMA * nu_star[next_state] - nu_star.repeat_interleave(4)
    torch.testing.assert_close(nu_tot, nu_star.float(), atol=0.08, rtol=0)
    torch.testing.assert_close(advantage_tot, expected_advantage.float(), atol=0.08, rtol=0)
    assert nu_star.abs().max() > 1.0  # the bootstrapped values are far from the one-step ones


def test_a_terminal_transition_backs_up_nothing():
    """The chain with every transition out of joint state (1, 1) terminal: nu* (Eq. 11 with A = r + gamma (1 - done)
    nu(s') - nu(s)) is (2.50, 2.79, 2.60, 1.37); bootstrapping from terminals moves it to (1.12, 1.45, 1.25, 1.54),
    1.4 away. The trained nu_tot lands 0.37 from the first (asserted < 0.7, halfway). Not closer: at batch 512 and
    lr 1e-3 it averaged (2.59, 3.11, 2.96, 1.26), 0.36 off, with an objective 9 % above the minimum, where the chain
    without terminals matches to 0.08 (the test above); why is open (docs/baselines.md, ComaDICE)."""
    torch.manual_seed(0)
    dataset = chain_dataset(episode_length=10, terminal_state=3)
    args, nu_tot, _ = trained_chain_values(dataset)
    divergence = comadice.F_DIVERGENCES[args.f_divergence]
    nu_star = exact_chain_nu(dataset, divergence, args.alpha)
    dataset.dones.zero_()
    nu_bootstrapping_terminals = exact_chain_nu(dataset, divergence, args.alpha)
    assert (nu_star - nu_bootstrapping_terminals).abs().max() > 1.0
    assert (nu_tot.double() - nu_star).abs().max() < 0.7, nu_tot.tolist()


def test_comadice_beats_behaviour_cloning_on_toy_task():
    """One-step task with done = 1, so every transition is also an initial state and Eq. 11's minimiser has
    E_D[w*] = 1 - gamma; soft-chi2 weights are then exp(A_tot / alpha), which favour actions near a*."""
    torch.manual_seed(0)
    dataset, best = toy_dataset()
    args = comadice.Args(alpha=0.5, gamma=0.9, hidden_dim=64, mixer_hidden_dim=16, q_lr=3e-3, nu_lr=3e-3,
                         policy_lr=3e-3)
    agents = comadice.Agents(2, dataset.obs_dim, 1, 1, args)
    optimizers = comadice.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        batch = dataset.sample(128, generator)
        comadice.update(agents, optimizers, batch, comadice.sample_initial_states(dataset, 128, generator), args)
    comadice_return, bc_return = toy_return(agents.policy, dataset, best), behaviour_cloning_return(dataset, best, 600)
    # BC recovers the behaviour mean (0, 0): return about -0.72. ComaDICE must move clearly towards a*.
    assert bc_return < -0.5
    assert comadice_return > bc_return + 0.4, (comadice_return, bc_return)
    with torch.no_grad():
        w, b = agents.mixer(dataset.states)
        advantage_tot = comadice.mix(w, agents.q(dataset.obs, dataset.actions) - agents.nu(dataset.obs), b)
        weight = comadice.occupancy_ratio(advantage_tot, comadice.F_DIVERGENCES[args.f_divergence], args.alpha)
    assert abs(weight.mean().item() - (1 - args.gamma)) < 0.03, weight.mean().item()
    # Fitting the mixer by Eq. 11 instead of Eq. 10 would drive its free bias down without bound (to about -14 here).
    assert b.abs().max() < 2.0, b.abs().max()


def test_smoke_run_writes_logs_checkpoint_and_final_line(tiny_hopper_dir, tmp_path):
    run = smoke_run("comadice.py", tiny_hopper_dir, tmp_path, "--f-divergence", "chi2")
    assert run.args["f_divergence"] == "chi2"
    assert {"values/w_mean", "values/w_max", "values/w_zero_fraction", "losses/nu", "losses/q"} <= run.scalars
    assert {"nu", "q", "policy"} <= set(run.checkpoint["optimizers"])