"""The scripts' discrete-action branch (SMAX), without jax: the categorical policy against torch's distribution, the
masks, OMCDA's categorical KL against torch's, OMIGA's policy at the soft optimum of a multi-step chain with one-hot
actions, and every in-sample script's update on discrete minibatches."""

import pytest
import torch

import bc
import comadice
import icq
import omcda
import omiga
from conftest import CHAIN_BEHAVIOUR, CHAIN_GAMMA, CHAIN_JOINT, chain_dataset, chain_joint_batch, chain_soft_optimum


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
    for script in (omiga, omcda, icq, comadice, bc):
        assert isinstance(script.make_policy(True, 1, 4, 3, 8), script.CategoricalPolicy)
        assert isinstance(script.make_policy(False, 1, 4, 3, 8), script.AgentPolicy)


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
    agents = omiga.Agents(2, dataset.obs_dim, 2, 4, args, discrete=True)
    optimizers = omiga.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4000):
        omiga.update(agents, optimizers, dataset.sample(128, generator), args)
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


def test_continuous_only_scripts_refuse_smax_maps_before_importing_jax(tmp_path):
    from conftest import run_script

    result = run_script("cql_ma.py", "--env", "5m_vs_6m", "--dataset", "good", cwd=tmp_path)
    assert result.returncode != 0
    assert "cql_ma.py trains on continuous actions only so far" in result.stderr and "Traceback" not in result.stderr
