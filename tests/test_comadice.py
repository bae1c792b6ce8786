"""ComaDICE: the f-divergence maths, the nu objective's convexity and minimiser, initial-state sampling, learning on a
toy task, and a smoke run."""


import numpy as np
import pytest
import torch

import comadice
from common.datasets import Dataset
from conftest import smoke_run
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
def test_nu_minimiser_balances_weights_against_initial_states(name):
    """At the minimiser of L_nu over a constant nu_i per agent, d/d nu_i = 0 reads
    E_D[w_i(s) w*(s, a)] = (1 - gamma) E_D0[w_i(s0)] for every agent i (Eq. 11 with Prop. 4.1's gradient)."""
    divergence, gamma, alpha = comadice.F_DIVERGENCES[name], 0.9, 1.0
    g = torch.Generator().manual_seed(0)
    n, size, initial_size = 2, 200, 50
    q = torch.randn(n, size, generator=g, dtype=torch.float64)
    w, w0 = (torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1 for k in (size, initial_size))
    b, b0 = (0.3 * torch.randn(k, generator=g, dtype=torch.float64) for k in (size, initial_size))
    nu = torch.zeros(n, 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([nu], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = comadice.nu_loss(comadice.mix(w0, nu.expand(n, initial_size), b0),
                                comadice.mix(w, q - nu.expand(n, size), b), divergence, alpha, gamma)
        loss.backward()
        return loss

    optimizer.step(closure)
    weight = comadice.occupancy_ratio(comadice.mix(w, q - nu.detach(), b), divergence, alpha)
    torch.testing.assert_close((w * weight).mean(1), (1 - gamma) * w0.mean(1), rtol=1e-5, atol=1e-8)
    assert 0.0 < weight.mean() < 1.0  # a real balance, not a degenerate all-zero weight


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