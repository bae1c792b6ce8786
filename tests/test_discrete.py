"""The scripts' discrete-action branch (SMAX), without jax: the categorical policy against torch's distribution, the
masks, OMCDA's categorical KL against torch's, the conservative scripts' critic of every action against the critic on
each one-hot, OMIGA's policy at the soft optimum of a multi-step chain with one-hot actions, and every in-sample
script's update on discrete minibatches; the conservative scripts' exact log-sum-exp over joint actions, their softmax
fixed point on the chain and their penalty on unseen actions."""

import itertools

import numpy as np
import pytest
import torch

import bc
import bcq_ma
import cfcql
import comadice
import cql_ma
import icq
import omar
import omcda
import omiga
from common.datasets import Batch
from conftest import (CHAIN_BEHAVIOUR, CHAIN_GAMMA, CHAIN_JOINT, CHAIN_REWARD, chain_dataset, chain_joint_batch,
                      chain_soft_optimum)


def train_on_chain(module, args, dataset, updates: int):
    """A script's two-agent Agents (one-hot actions) after `updates` updates on minibatches of the discrete chain."""
    agents = module.Agents(2, dataset.obs_dim, 2, 4, args, discrete=True)
    optimizers = module.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(updates):
        module.update(agents, optimizers, dataset.sample(128, generator), args)
    return agents


def random_masks(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Random availability masks with at least one available action per row (the last)."""
    avail = torch.rand(shape, generator=generator) < 0.5
    avail[..., -1] = True
    return avail


def test_categorical_policy_is_torchs_categorical_on_the_available_actions():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    policy = omiga.CategoricalPolicy(1, 5, 6, 16)
    obs = torch.randn(3, 40, 5, generator=generator)  # [n, B, obs_dim]
    avail = random_masks(generator, (3, 40, 6))
    actions = torch.multinomial(avail.reshape(-1, 6).float(), 1, generator=generator).reshape(3, 40)
    logits = policy.net(obs).masked_fill(~avail, -torch.inf)
    expected = torch.distributions.Categorical(logits=logits)
    one_hot = torch.nn.functional.one_hot(actions, 6).float()
    torch.testing.assert_close(policy.log_prob(obs, one_hot, avail), expected.log_prob(actions))
    probs = policy.log_probs(obs, avail).exp()
    assert (probs[~avail] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 40))
    greedy = policy.act(obs, avail)
    assert (greedy.sum(-1) == 1).all() and avail[greedy.bool()].all()
    torch.testing.assert_close(greedy.argmax(-1), expected.probs.argmax(-1))
    # the gradient of log pi(a) reaches only the available logits
    policy.log_prob(obs, one_hot, avail).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in policy.parameters())


def test_every_script_builds_the_policy_of_the_action_type():
    for script in (omiga, omcda, icq, comadice, bc, cql_ma, cfcql):
        assert isinstance(script.make_policy(True, 1, 4, 3, 8), script.CategoricalPolicy)
        assert isinstance(script.make_policy(False, 1, 4, 3, 8), script.AgentPolicy)
    assert isinstance(omar.Agents(2, 4, 3, 1, omar.Args(), discrete=True).policy, omar.CategoricalPolicy)
    assert isinstance(omar.Agents(2, 4, 3, 1, omar.Args()).policy, omar.AgentActor)
    assert isinstance(bcq_ma.Agents(2, 4, 3, 1, bcq_ma.Args(), discrete=True).policy, bcq_ma.DiscreteBCQPolicy)
    assert isinstance(bcq_ma.Agents(2, 4, 3, 1, bcq_ma.Args()).policy, bcq_ma.BCQPolicy)


def test_categorical_kl_matches_torch_with_masks():
    generator = torch.Generator().manual_seed(1)
    avail = random_masks(generator, (2, 30, 7))
    torch.manual_seed(1)
    policy, behaviour = omcda.CategoricalPolicy(1, 4, 7, 16), omcda.CategoricalPolicy(1, 4, 7, 16)
    obs = torch.randn(2, 30, 4, generator=generator)
    kl = omcda.extracted_policy_kl(policy, behaviour, obs, avail)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=policy.net(obs).masked_fill(~avail, -torch.inf)),
        torch.distributions.Categorical(logits=behaviour.net(obs).masked_fill(~avail, -torch.inf)))
    torch.testing.assert_close(kl, expected)
    assert (kl > 0).all()
    torch.testing.assert_close(omcda.extracted_policy_kl(policy, policy, obs, avail), torch.zeros(2, 30))


def test_omiga_discrete_policy_reaches_the_soft_optimum_on_a_multi_step_chain():
    """gamma 0.8, no terminals, alpha 0.5, one-hot actions: each agent's categorical policy is pi*_i ∝ pi_b,i exp(
    (Q_i - V_i) / alpha), the closed-form soft optimum, which here prefers the other action than the behaviour does
    in three of the four (agent, state) pairs."""
    torch.manual_seed(0)
    dataset = chain_dataset(discrete=True)
    args = omiga.Args(alpha=0.5, gamma=CHAIN_GAMMA, tau=0.05, hidden_dim=64, mixer_hidden_dim=32, q_lr=2e-3,
                      v_lr=2e-3, policy_lr=2e-3)
    agents = train_on_chain(omiga, args, dataset, 4000)
    batch = chain_joint_batch(dataset)
    with torch.no_grad():
        probs = agents.policy.log_probs(batch.obs, batch.avail).exp()  # [n, 16, 2]
    optimum = [chain_soft_optimum(i, args.alpha)[2] for i in range(2)]
    for k, (s0, s1, _, _) in enumerate(CHAIN_JOINT):
        for i, s in ((0, s0), (1, s1)):
            torch.testing.assert_close(probs[i, k], torch.tensor(optimum[i][s], dtype=torch.float32), atol=0.06, rtol=0)
    assert max(abs(optimum[i][s, 0] - CHAIN_BEHAVIOUR[i, s, 0]) for i in range(2) for s in range(2)) > 0.3


@pytest.mark.parametrize("script", ["omcda", "icq", "comadice", "bc"])
def test_in_sample_scripts_train_on_discrete_minibatches(script):
    """A few hundred updates on the chain's one-hot actions: finite metrics, and a categorical policy that gives the
    dataset's actions more likelihood than at the start (OMCDA, which starts from its behaviour clone: a policy that
    has moved away from it, by the categorical KL it logs)."""
    module = {"omcda": omcda, "icq": icq, "comadice": comadice, "bc": bc}[script]
    torch.manual_seed(0)
    dataset = chain_dataset(episode_length=20, discrete=True)
    args = module.Args(hidden_dim=32, **({} if script == "bc" else dict(mixer_hidden_dim=16)))
    agents = module.Agents(2, dataset.obs_dim, 2, 4, args, discrete=True)
    assert isinstance(agents.policy, module.CategoricalPolicy)
    optimizers = module.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    probe = dataset.gather(torch.arange(len(dataset)))

    def likelihood() -> float:
        with torch.no_grad():
            return agents.policy.log_prob(probe.obs, probe.actions, probe.avail).mean().item()

    if script == "omcda":
        args.bc_steps = 300
        omcda.pretrain_behaviour(agents, dataset, args, generator)
    before = likelihood()
    sampler = icq.NextActionSampler(dataset) if script == "icq" else dataset
    for _ in range(300):
        batch = sampler.sample(64, generator)
        if script == "comadice":
            metrics = comadice.update(agents, optimizers, batch, comadice.sample_initial_states(dataset, 64, generator),
                                      args)
        else:
            metrics = module.update(agents, optimizers, batch, args)
    assert all(torch.isfinite(value).all() for value in metrics.values())
    if script == "omcda":
        assert (metrics["agents/policy_kl"] > 1e-3).all()
    else:
        assert likelihood() > before + 0.02


@pytest.mark.parametrize("module", [cql_ma, cfcql, omar, bcq_ma], ids=lambda m: m.__name__)
@pytest.mark.parametrize("weight_sets", [1, 3], ids=["shared", "per_agent"])
def test_q_of_every_action_is_the_critic_on_each_one_hot_with_its_gradients(module, weight_sets):
    torch.manual_seed(0)
    obs_dim, act_dim = 7, 4
    critic = module.AgentQ(weight_sets, obs_dim, act_dim, 16)
    obs = torch.randn(3, 5, obs_dim)
    fast = module.q_of_every_action(critic, obs, act_dim)
    one_hots = torch.eye(act_dim)[:, None, None].expand(-1, 3, 5, -1)
    direct = torch.stack([critic(obs, one_hot) for one_hot in one_hots], -1)
    torch.testing.assert_close(fast, direct)
    cotangent = torch.randn(3, 5, act_dim)
    fast_grads = torch.autograd.grad((fast * cotangent).sum(), list(critic.parameters()))
    direct_grads = torch.autograd.grad((direct * cotangent).sum(), list(critic.parameters()))
    for fast_grad, direct_grad in zip(fast_grads, direct_grads):
        torch.testing.assert_close(fast_grad, direct_grad)


def test_cql_joint_log_sum_exp_is_the_sum_over_every_available_joint_action():
    """3 agents, 4 actions, random masks: the factorised log-sum-exp equals the brute-force sum of exp Q_tot over the
    available joint actions, and no gradient reaches an unavailable action's Q."""
    generator = torch.Generator().manual_seed(2)
    n, batch_size, act_dim = 3, 5, 4
    w, b = torch.rand(n, batch_size, generator=generator) * 2, torch.randn(batch_size, generator=generator)
    q_all = torch.randn(n, batch_size, act_dim, generator=generator, requires_grad=True)
    avail = random_masks(generator, (n, batch_size, act_dim))
    fast = cql_ma.joint_log_sum_exp(w, q_all, b, avail)
    for k in range(batch_size):
        joint = [sum(w[i, k] * q_all[i, k, a[i]] for i in range(n)) + b[k]
                 for a in itertools.product(range(act_dim), repeat=n) if all(avail[i, k, a[i]] for i in range(n))]
        torch.testing.assert_close(fast[k], torch.logsumexp(torch.stack(joint), 0))
    fast.sum().backward()
    assert (q_all.grad[~avail] == 0).all() and (q_all.grad[avail] > 0).all()


def test_cfcql_discrete_penalty_is_each_agents_counterfactual_sum_and_cql_ma_s_over_n():
    """3 agents, 4 actions, random masks: R_i equals the brute-force log-sum-exp of Q_tot over agent i's available
    actions with the others at the data, minus Q_tot at the data; averaged with lambda_i = 1/n the penalty is
    cql_ma.py's joint one divided by n; no gradient reaches an unavailable action's Q."""
    generator = torch.Generator().manual_seed(3)
    n, batch_size, act_dim = 3, 5, 4
    w, b = torch.rand(n, batch_size, generator=generator) * 2, torch.randn(batch_size, generator=generator)
    q_all = torch.randn(n, batch_size, act_dim, generator=generator, requires_grad=True)
    avail = random_masks(generator, (n, batch_size, act_dim))
    data = torch.multinomial(avail.reshape(-1, act_dim).float(), 1, generator=generator).reshape(n, batch_size)
    data_q = q_all.gather(-1, data[..., None]).squeeze(-1)
    penalties = cfcql.counterfactual_penalties_discrete(w, q_all, data_q, avail)
    q_tot = cfcql.mix(w, data_q, b)
    for i in range(n):
        for k in range(batch_size):
            swapped = [q_tot[k] + w[i, k] * (q_all[i, k, a] - data_q[i, k]) for a in range(act_dim) if avail[i, k, a]]
            torch.testing.assert_close(penalties[i, k], torch.logsumexp(torch.stack(swapped), 0) - q_tot[k])
    uniform = cfcql.agent_weights_discrete(w, q_all.detach(), avail, None, 0.0)
    torch.testing.assert_close((uniform * penalties).sum(0), (cql_ma.joint_log_sum_exp(w, q_all, b, avail) - q_tot) / n)
    penalties.sum().backward()
    assert (q_all.grad[~avail] == 0).all()


def test_cfcql_discrete_agent_weights_are_a_softmax_of_torchs_kl():
    """lambda_i = softmax_i(tau KL(mu_i || beta_i)) with mu_i = softmax of w_i Q_i over the available actions: the KL
    against torch's for categoricals with masks, and the agent whose mu strays furthest from beta weighs most."""
    generator = torch.Generator().manual_seed(4)
    n, batch_size, act_dim, tau = 3, 6, 5, 2.0
    w, q_all = torch.rand(n, batch_size, generator=generator), torch.randn(n, batch_size, act_dim, generator=generator)
    avail = random_masks(generator, (n, batch_size, act_dim))
    beta_logits = torch.randn(n, batch_size, act_dim, generator=generator).masked_fill(~avail, -torch.inf)
    behaviour_log_probs = torch.log_softmax(beta_logits, -1)
    weights = cfcql.agent_weights_discrete(w, q_all, avail, behaviour_log_probs, tau)
    mu = torch.distributions.Categorical(logits=(w[..., None] * q_all).masked_fill(~avail, -torch.inf))
    kl = torch.distributions.kl_divergence(mu, torch.distributions.Categorical(logits=beta_logits))
    torch.testing.assert_close(weights, torch.softmax(tau * kl, 0))
    assert (weights.argmax(0) == kl.argmax(0)).all()
    uniform = cfcql.agent_weights_discrete(w, q_all, avail, None, 0.0)
    torch.testing.assert_close(uniform, torch.full((n, batch_size), 1 / n))


def softmax_policy_iteration(agent: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The fixed point of discrete SAC without entropy in the backup, on one agent of the chain (s' = a): Q = Q^pi
    (plain Bellman equation under pi) and pi = softmax(Q / alpha); damped iteration. Returns Q [s, a], pi [s, a]."""
    reward, pi = CHAIN_REWARD[agent], np.full((2, 2), 0.5)
    for _ in range(300):
        v = np.zeros(2)
        for _ in range(200):
            q = reward + CHAIN_GAMMA * v[None, :]
            v = (pi * q).sum(1)
        greedy = np.exp(q / alpha)
        pi = 0.5 * pi + 0.5 * greedy / greedy.sum(1, keepdims=True)
    return q, pi


@pytest.mark.parametrize("module", [cql_ma, cfcql], ids=["cql_ma", "cfcql"])
def test_conservative_discrete_reaches_the_softmax_fixed_point_of_a_multi_step_chain(module):
    """Penalty off, temperature held at 0.5: the critic must learn Q^pi with the exact expected backup and each
    categorical policy softmax(w_i Q_i / alpha); on the chain this fixed point moves agent 1 in state 1 from the
    behaviour's 0.9 / 0.1 to about 0.05 / 0.95."""
    torch.manual_seed(0)
    dataset = chain_dataset(discrete=True)
    args = module.Args(gamma=CHAIN_GAMMA, tau=0.05, cql_alpha=0.0, hidden_dim=64, mixer_hidden_dim=32, q_lr=2e-3,
                       policy_lr=2e-3)
    agents = module.Agents(2, dataset.obs_dim, 2, 4, args, discrete=True)
    agents.log_entropy_alpha.data.fill_(np.log(0.5))
    optimizers = module.make_optimizers(agents, args)
    optimizers["entropy"].param_groups[0]["lr"] = 0.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(3000):
        module.update(agents, optimizers, dataset.sample(128, generator), args)
    batch = chain_joint_batch(dataset)
    q_star, pi_star = zip(*(softmax_policy_iteration(i, 0.5) for i in range(2)))
    with torch.no_grad():
        probs = agents.policy.log_probs(batch.obs, batch.avail).exp()
        w, b = agents.mixer(batch.states)
        q_tot = module.mix(w, agents.q(batch.obs, batch.actions), b)
    for k, (s0, s1, a0, a1) in enumerate(CHAIN_JOINT):
        assert abs(q_tot[k].item() - (q_star[0][s0, a0] + q_star[1][s1, a1])) < 0.15, k
        for i, s in ((0, s0), (1, s1)):
            torch.testing.assert_close(probs[i, k], torch.tensor(pi_star[i][s], dtype=torch.float32), atol=0.05, rtol=0)
    assert pi_star[1][1, 1] - CHAIN_BEHAVIOUR[1, 1, 1] > 0.8


def independent_greedy_q(agent: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """The fixed point of an independent learner on the chain that sees the joint state s = (s_0, s_1), takes the team
    reward and bootstraps greedily on its own Q, the other agent acting as in the data:
    Q_i(s, a_i) = r_i(s_i, a_i) + sum_{a_-i} b_-i(a_-i | s_-i) [r_-i(s_-i, a_-i) + gamma max_a' Q_i(s', a')],
    s'_i = a_i, s'_-i = a_-i; with allowed [s_i, a] the max runs over the a' allowed in s'_i only.
    Returns Q_i [s_0, s_1, a_i]."""
    other = 1 - agent
    allowed = np.ones((2, 2), bool) if allowed is None else allowed
    q = np.zeros((2, 2, 2))
    for _ in range(300):
        new = np.zeros_like(q)
        for s0, s1, a in itertools.product(range(2), repeat=3):
            own, theirs = (s0, s1)[agent], (s0, s1)[other]
            for b in range(2):
                nxt = (a, b) if agent == 0 else (b, a)
                new[s0, s1, a] += CHAIN_BEHAVIOUR[other, theirs, b] * (
                    CHAIN_REWARD[other, theirs, b] + CHAIN_GAMMA * q[nxt][allowed[a]].max())
            new[s0, s1, a] += CHAIN_REWARD[agent, own, a]
        q = new
    return q


def test_omar_discrete_reaches_the_independent_greedy_fixed_point_of_a_multi_step_chain():
    """Penalty off: each agent's twin critics must learn the greedy fixed point of its own independent Q through the
    expected backup under its (target) policy, and the actor, pulled by the cross-entropy towards argmax Q^1_i and by
    the expected Q^1_i, must put its mass on that argmax. In state 1 agent 1's greedy action (1) is the one its
    behaviour takes 0.1 of the time."""
    torch.manual_seed(0)
    dataset = chain_dataset(discrete=True)
    args = omar.Args(gamma=CHAIN_GAMMA, tau=0.05, cql_alpha=0.0, omar_coe=0.5, hidden_dim=64, q_lr=2e-3,
                     policy_lr=2e-3, grad_clip=10.0)
    agents = train_on_chain(omar, args, dataset, 2000)
    batch = chain_joint_batch(dataset)
    with torch.no_grad():
        probs = agents.policy.log_probs(batch.obs, batch.avail).exp()
        q = [omar.q_of_every_action(critic, batch.obs, 2) for critic in agents.q]
    for i in range(2):
        q_star = independent_greedy_q(i)
        for k, (s0, s1, _, _) in enumerate(CHAIN_JOINT):
            for critic in q:
                torch.testing.assert_close(critic[i, k], torch.tensor(q_star[s0, s1], dtype=torch.float32), atol=0.2,
                                           rtol=0)
            assert probs[i, k, q_star[s0, s1].argmax()] > 0.9, (i, k, probs[i, k])
    assert independent_greedy_q(1)[:, 1].argmax(-1).tolist() == [1, 1] and CHAIN_BEHAVIOUR[1, 1, 1] == 0.1


def test_bcq_candidates_are_the_available_actions_the_behaviour_model_deems_likely_enough():
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    behaviour = bcq_ma.CategoricalPolicy(1, 4, 6, 16)
    with torch.no_grad():
        behaviour.net[-1].weight.mul_(10.0)  # spread the probabilities, so that the filter removes some actions
    obs, avail = torch.randn(2, 30, 4, generator=generator), random_masks(generator, (2, 30, 6))
    candidates = bcq_ma.candidate_actions(behaviour, obs, avail, 0.3)
    probs = behaviour.log_probs(obs, avail).exp()
    expected = avail & (probs / probs.max(-1, keepdim=True).values > 0.3)
    assert torch.equal(candidates, expected) and candidates.any(-1).all()
    assert not candidates[~avail].any() and (candidates.sum(-1) < avail.sum(-1)).any()
    assert torch.equal(bcq_ma.candidate_actions(behaviour, obs, avail, 0.0), avail)  # threshold 0: every available
    with pytest.raises(ValueError, match="--threshold 1.0"):
        bcq_ma.Agents(2, 4, 6, 1, bcq_ma.Args(threshold=1.0), discrete=True)


@pytest.mark.parametrize("threshold", [1e-3, 0.5])
def test_bcq_discrete_reaches_the_fixed_point_of_its_candidate_set_on_a_multi_step_chain(threshold):
    """The twin critics must learn the independent fixed point whose max runs over discrete BCQ's candidates, and the
    policy must take the best candidate. Threshold 1e-3 admits every action (plain greedy Q-learning); 0.5 admits in
    each local state only the behaviour's likelier action, so in state 1 agent 1 must keep the behaviour's action 0
    (taken 0.9 of the time) although greedy Q prefers action 1."""
    torch.manual_seed(0)
    dataset = chain_dataset(discrete=True)
    args = bcq_ma.Args(gamma=CHAIN_GAMMA, tau=0.05, threshold=threshold, hidden_dim=64, q_lr=2e-3, vae_lr=2e-3)
    agents = train_on_chain(bcq_ma, args, dataset, 3000)
    batch = chain_joint_batch(dataset)
    with torch.no_grad():
        actions = agents.policy.act(batch.obs, batch.avail).argmax(-1)
        q = [bcq_ma.q_of_every_action(critic, batch.obs, 2) for critic in (agents.critic.q1, agents.critic.q2)]
    for i in range(2):
        allowed = CHAIN_BEHAVIOUR[i] / CHAIN_BEHAVIOUR[i].max(-1, keepdims=True) > threshold
        q_star = independent_greedy_q(i, allowed)
        for k, (s0, s1, _, _) in enumerate(CHAIN_JOINT):
            own = (s0, s1)[i]
            for critic in q:
                torch.testing.assert_close(critic[i, k], torch.tensor(q_star[s0, s1], dtype=torch.float32), atol=0.2,
                                           rtol=0)
            assert actions[i, k] == np.where(allowed[own], q_star[s0, s1], -np.inf).argmax(), (i, k)
    greedy_in_state_1 = independent_greedy_q(1)[:, 1].argmax(-1)
    assert (actions[1, [k for k, joint in enumerate(CHAIN_JOINT) if joint[1] == 1]] ==
            (0 if threshold == 0.5 else 1)).all() and greedy_in_state_1.tolist() == [1, 1]


def one_action_batch(batch_size: int, act_dim: int = 3) -> Batch:
    """One-step task, reward 0, both agents always take action 0 of act_dim, the last action never available."""
    ones, zeros = torch.ones(batch_size, 1), torch.zeros(batch_size)
    avail = torch.ones(2, batch_size, act_dim, dtype=torch.bool)
    avail[..., -1] = False
    actions = torch.nn.functional.one_hot(torch.zeros(2, batch_size, dtype=torch.long), act_dim).float()
    return Batch(obs=ones.expand(2, -1, -1), actions=actions, rewards=zeros, next_obs=ones.expand(2, -1, -1),
                 dones=torch.ones(batch_size), states=ones, next_states=ones, avail=avail, next_avail=avail)


@pytest.mark.parametrize("script", ["cql_ma", "cfcql", "omar"])
def test_discrete_penalty_lowers_q_of_the_unseen_available_actions(script):
    """Action 1 is available but never taken: the penalty must push its Q_tot (OMAR: the sum of the agents' Q^1_i)
    below the data action's, which the TD target keeps at 0 either way."""
    module = {"cql_ma": cql_ma, "cfcql": cfcql, "omar": omar}[script]

    def q_tot_of_each_action(cql_alpha: float) -> torch.Tensor:
        torch.manual_seed(0)
        args = module.Args(cql_alpha=cql_alpha, hidden_dim=32, q_lr=3e-3)
        agents = module.Agents(2, 1, 3, 1, args, discrete=True)
        optimizers = module.make_optimizers(agents, args)
        for _ in range(300):
            metrics = module.update(agents, optimizers, one_action_batch(64), args)
        assert all(torch.isfinite(value).all() for value in metrics.values())
        if script == "omar":  # the rectification target is an available action: its cross-entropy stays small
            assert metrics["losses/rectification"] < 2.0
        batch = one_action_batch(1)
        with torch.no_grad():
            if script == "omar":
                return torch.stack([agents.q[0](batch.obs, torch.eye(3)[a].expand(2, 1, 3)).sum() for a in range(2)])
            w, b = agents.mixer(batch.states)
            return torch.stack([module.mix(w, agents.q(batch.obs, torch.eye(3)[a].expand(2, 1, 3)), b)[0]
                                for a in range(2)])

    plain, conservative = q_tot_of_each_action(0.0), q_tot_of_each_action(1.0)
    assert abs(plain[0]) < 0.2 and abs(conservative[0]) < 0.3
    assert conservative[1] < conservative[0] - 1.0 and conservative[1] < plain[1] - 1.0, (plain, conservative)
