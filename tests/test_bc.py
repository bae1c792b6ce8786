"""BC: recovery of a known behaviour policy and a smoke run."""

import pytest
import torch

import bc
from common.datasets import Batch
from conftest import smoke_run

# Behaviour policy of the toy: per agent and per context, a = tanh(mean + std * N(0, 1)).
TRUE_MEAN = torch.tensor([[0.5, -0.8], [-0.2, 1.0]])  # [agent, context]
TRUE_STD = torch.tensor([[0.3, 0.1], [0.6, 0.2]])



def two_context_batch(batch_size: int, generator: torch.Generator) -> Batch:
    """Two agents, each seeing one of two contexts (a one-hot observation, then its one-hot id as in every script's
    inputs) and acting from the behaviour policy."""
    context = torch.randint(2, (2, batch_size), generator=generator)
    agent_id = torch.eye(2)[:, None].expand(2, batch_size, 2)
    obs = torch.cat([torch.nn.functional.one_hot(context, 2).float(), agent_id], -1)
    noise = torch.randn(2, batch_size, generator=generator)
    pre_tanh = TRUE_MEAN.gather(1, context) + TRUE_STD.gather(1, context) * noise
    zeros = torch.zeros(batch_size)
    return Batch(obs=obs, actions=torch.tanh(pre_tanh)[..., None], rewards=zeros, next_obs=obs, dones=zeros,
                 states=zeros[:, None], next_states=zeros[:, None])


def test_tanh_gaussian_log_prob_is_the_density_of_the_squashed_gaussian():
    """The log-density every script shares is torch.distributions' tanh-transformed Normal, Jacobian included (BC's
    gradients cannot see the Jacobian, a constant in the mean and std; the importance weights of cfcql.py can)."""
    mean, log_std = torch.tensor([[0.3, -1.2], [0.0, 0.8]]), torch.tensor([[-0.5, 0.4], [0.1, -1.0]])
    actions = torch.tensor([[0.2, -0.95], [-0.6, 0.7]])  # [samples, action dims]
    squashed = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()])
    torch.testing.assert_close(bc.tanh_gaussian_log_prob(mean, log_std, actions), squashed.log_prob(actions).sum(-1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_agent_networks", [False, True])
def test_bc_recovers_the_behaviour_mean_and_std_of_every_agent(per_agent_networks):
    torch.manual_seed(0)
    args = bc.Args(hidden_dim=32, policy_lr=1e-3, per_agent_networks=per_agent_networks)
    agents = bc.Agents(2, 4, 1, 1, args)
    optimizers = bc.make_optimizers(agents, args)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        bc.update(agents, optimizers, two_context_batch(512, generator), args)
    with torch.no_grad():
        contexts = torch.cat([torch.eye(2).expand(2, 2, 2), torch.eye(2)[:, None].expand(2, 2, 2)], -1)  # [agent, context, obs]
        mean, log_std = agents.policy(contexts)
    torch.testing.assert_close(mean.squeeze(-1), TRUE_MEAN, atol=0.05, rtol=0)
    torch.testing.assert_close(log_std.exp().squeeze(-1), TRUE_STD, atol=0.03, rtol=0)



def test_smoke_run_writes_logs_checkpoint_and_final_line(tiny_hopper_dir, tmp_path):
    run = smoke_run("bc.py", tiny_hopper_dir, tmp_path)
    assert {"losses/policy", "values/gaussian_std"} <= run.scalars
    assert set(run.checkpoint["optimizers"]) == {"policy"}
