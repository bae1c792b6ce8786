"""common/smax_collect.py: MAPPO's advantage estimate and losses and masked sampling (no jax needed), and, where jaxmarl
is installed, episodes rolled out on SMAX into the native format and every discrete-capable script's smoke run on
them."""

import importlib.util
import re

import numpy as np
import pytest
import torch

from common.datasets import load_dataset, read_dataset
from common.smax_collect import Actor, gae, masked_logits, ppo_losses, sample_actions

needs_smax = pytest.mark.skipif(importlib.util.find_spec("jaxmarl") is None,
                                reason="needs jaxmarl (pip install -r requirements-smax.txt)")


def test_gae_on_a_hand_computed_rollout():
    """gamma = lambda = 0.5. Env 0 terminates at t = 1 (its next value must be ignored); env 1 is cut by the time
    limit at t = 1 (it bootstraps from the state it reached, and the sum stops there)."""
    rewards = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    values = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.5, 0.0]])
    next_values = torch.tensor([[1.0, 2.0], [9.0, 4.0], [2.0, 8.0]])
    terminated = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    ends = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    # env 0: deltas 1, 1, 2.5 -> A = (1 + 0.25 * 1, 1, 2.5); env 1: deltas 2, 3, 5 -> A = (2 + 0.25 * 3, 3, 5)
    expected = torch.tensor([[1.25, 2.75], [1.0, 3.0], [2.5, 5.0]])
    torch.testing.assert_close(gae(rewards, values, next_values, terminated, ends, 0.5, 0.5), expected)


def test_ppo_policy_gradient_and_clipping():
    """At ratio 1 the policy loss's gradient on the logits is -A (onehot(a) - p) / rows; a row whose ratio lies past
    1 + clip with A > 0 gives none; the entropy counts only available actions."""
    avail = torch.tensor([[[True, True, True]], [[True, True, False]]])
    logits = torch.zeros(2, 1, 3, requires_grad=True)
    actions = torch.tensor([[0], [1]])
    masked = masked_logits(logits, avail)
    log_prob = torch.log_softmax(masked, -1).gather(-1, actions[..., None]).squeeze(-1).detach()
    advantages = torch.tensor([2.0, 3.0])
    zeros = torch.zeros(2)
    policy_loss, entropy, _ = ppo_losses(masked, actions, log_prob, advantages, zeros, zeros, clip=0.2)
    policy_loss.backward()
    probs = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    onehot = torch.nn.functional.one_hot(actions[:, 0], 3).float()
    torch.testing.assert_close(logits.grad[:, 0], -advantages[:, None] * (onehot - probs) / 2)
    torch.testing.assert_close(entropy, torch.tensor((np.log(3) + np.log(2)) / 2, dtype=torch.float32))

    logits.grad = None
    past_clip = log_prob - torch.tensor([[np.log(1.5)], [np.log(1.1)]], dtype=torch.float32)  # ratios 1.5 and 1.1
    policy_loss, _, _ = ppo_losses(masked_logits(logits, avail), actions, past_clip, advantages, zeros, zeros, 0.2)
    policy_loss.backward()
    assert logits.grad[0].abs().max() == 0 and logits.grad[1].abs().max() > 0


def test_value_loss_is_the_squared_error_to_the_returns():
    values, returns = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 5.0])
    logits = torch.zeros(2, 1, 2)
    _, _, value_loss = ppo_losses(logits, torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), -np.log(2)),
                                  torch.zeros(2), values, returns, 0.2)
    assert value_loss.item() == pytest.approx((1 + 9) / 2)


def test_masked_sampling_never_draws_an_unavailable_action_and_follows_the_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=generator)
    avail = torch.rand(4, 6, generator=generator) < 0.5
    avail[:, 2] = True
    draws = sample_actions(masked_logits(logits, avail).expand(4000, 4, 6), generator)
    assert avail.gather(1, draws.T).all()
    probs = torch.softmax(logits.masked_fill(~avail, -torch.inf), -1)
    frequencies = torch.nn.functional.one_hot(draws, 6).float().mean(0)
    torch.testing.assert_close(frequencies, probs, atol=0.03, rtol=0)


@needs_smax
def test_rollout_episodes_whole_round_robin_and_consistent(tmp_path):
    from common.datasets import write_dataset
    from common.smax import SMAXEnv
    from common.smax_collect import rollout_episodes

    env = SMAXEnv("3m")
    torch.manual_seed(0)
    actor = Actor(env.obs_dim, env.act_dim)
    arrays, wins = rollout_episodes(actor, "3m", episodes=6, seed=3, num_envs=4)
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    assert len(ends) == 6 == len(wins) and ends[-1] == len(arrays["rewards"]) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    for start, end in zip(starts, ends):  # within an episode, each step starts where the last one ended
        np.testing.assert_array_equal(arrays["observations"][start + 1:end + 1], arrays["next_observations"][start:end])
        np.testing.assert_array_equal(arrays["states"][start + 1:end + 1], arrays["next_states"][start:end])
        np.testing.assert_array_equal(arrays["avail_actions"][start + 1:end + 1], arrays["next_avail_actions"][start:end])
    assert arrays["observations"].shape[1:] == (3, env.obs_dim - 3)  # stored without the one-hot id
    returns = np.add.reduceat(arrays["rewards"], starts)
    np.testing.assert_array_equal(wins, [arrays["rewards"][end] >= 10 for end in ends])  # the win bonus, scaled
    assert np.all((returns >= 0) & (returns <= 20))
    path = write_dataset(tmp_path / "3m-poor.hdf5", arrays, dict(env="3m", obs_mode="local", win_rate=wins.mean()))
    assert read_dataset(path)[1]["discrete"]
    assert load_dataset(path, "cpu", "local").obs.shape == (3, len(arrays["rewards"]), env.obs_dim)


@pytest.fixture(scope="module")
def tiny_smax_dir(tmp_path_factory):
    """A 12-episode 3m 'poor' dataset made by generate_dataset from a hand-made bundle holding an untrained actor."""
    from common.collect import fp16_state
    from common.smax import SMAXEnv
    from common.smax_collect import HIDDEN, generate_dataset

    env = SMAXEnv("3m")
    torch.manual_seed(0)
    actor = Actor(env.obs_dim, env.act_dim)
    record = dict(step=0, return_mean=0.0, return_std=0.0, win_rate=0.0, actor=fp16_state(actor))
    policy_dir, data_dir = tmp_path_factory.mktemp("policies"), tmp_path_factory.mktemp("data")
    torch.save(dict(map="3m", hidden=HIDDEN, policies={"poor": record}, curve=[]), policy_dir / "smax-3m.pt")
    path = generate_dataset("3m", "poor", data_dir, episodes=12, seed=0, policy_dir=policy_dir)
    assert path.name == "3m-poor.hdf5"
    return data_dir


@needs_smax
@pytest.mark.parametrize("script, extra", [("omiga.py", ()), ("omcda.py", ("--bc-steps", "10")), ("icq.py", ()),
                                           ("comadice.py", ()), ("bc.py", ()), ("cql_ma.py", ()),
                                           ("cfcql.py", ("--cf-tau", "1.0")), ("omar.py", ()),
                                           ("bcq_ma.py", ("--value-deviation", "--transition-normalization"))])
def test_script_trains_and_evaluates_on_a_tiny_smax_dataset(tiny_smax_dir, tmp_path, script, extra):
    """Every discrete-capable script runs on SMAX: local observations by default, evaluation through SMAXEnv, which
    raises on any unavailable action (so a finished run never took one), and the win rate logged and reported."""
    import json

    from conftest import run_script

    result = run_script(script, "--env", "3m", "--dataset", "poor", "--data-dir", str(tiny_smax_dir), "--no-generate",
                        "--total-steps", "20", "--eval-every", "10", "--eval-episodes", "2",
                        "--final-eval-episodes", "3", "--log-every", "10", "--exp-name", "smoke", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^final return: \d+\.\d+ ± \d+\.\d+ over 3 episodes, win rate \d\.\d\d$", result.stdout, re.M)
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["args"]["obs_mode"] == "local" and "win_rate" in saved["dataset"]
    assert [e["step"] for e in saved["evaluations"]] == [10, 20]
    assert all(0.0 <= e["win_rate"] <= 1.0 for e in saved["evaluations"])


def test_select_keeps_the_checkpoint_nearest_each_target_return(tmp_path):
    """Targets 20 / 11.03 / 8.5 (OMIGA's SMAC data, 5m_vs_6m); where the best checkpoint falls short of 20 they are scaled by
    best / 20 (here 10 / 20: 10 / 5.515 / 4.25). Candidates come from every run given."""
    from common.smax_collect import TARGET_RETURNS, load_policies, select

    def save_run(run_dir, returns, hidden=8, map_name="5m_vs_6m"):
        history = [dict(step=100 * k, return_mean=r, return_std=1.0, win_rate=r / 20, actor={"w": torch.zeros(1)})
                   for k, r in enumerate(returns)]
        run_dir.mkdir()
        torch.save(dict(history=history, map=map_name, hidden=hidden, steps=100 * len(returns),
                        settings=dict(lr=2e-3)), run_dir / "train_state.pt")
        return run_dir

    assert TARGET_RETURNS["5m_vs_6m"] == {"good": 20.0, "medium": 11.03, "poor": 8.5}
    for name, returns, expected, scale in (
            ("a", [1.5, 8.0, 9.0, 11.5, 20.5], {"good": 400, "medium": 300, "poor": 100}, 1.0),
            ("b", [1.5, 4.0, 5.0, 6.5, 10.0], {"good": 400, "medium": 200, "poor": 100}, 0.5)):
        run = save_run(tmp_path / name, returns)
        out = select("5m_vs_6m", [run], tmp_path / "smax-5m_vs_6m.pt")
        bundle = load_policies("5m_vs_6m", tmp_path)
        assert out.name == "smax-5m_vs_6m.pt" and bundle["target_scale"] == scale
        # unscaled, poor 8.5 lies between 8.0 and 9.0 at equal distance: the first is kept
        assert {q: r["step"] for q, r in bundle["policies"].items()} == expected
        (curve,) = [run["curve"] for run in bundle["runs"]]
        assert [record["return_mean"] for record in curve] == returns and "actor" not in curve[0]
        assert bundle["runs"][0]["settings"] == dict(lr=2e-3)
    # a long run with coarse checkpoints and a short one with dense early ones: poor and medium come from the short
    coarse = save_run(tmp_path / "coarse", [1.5, 6.0, 9.0, 10.0])
    dense = save_run(tmp_path / "dense", [1.5, 3.0, 4.3, 5.0, 5.5])
    select("5m_vs_6m", [coarse, dense], tmp_path / "smax-5m_vs_6m.pt")
    bundle = load_policies("5m_vs_6m", tmp_path)
    assert {q: (r["run"], r["step"]) for q, r in bundle["policies"].items()} == {
        "good": (0, 300), "medium": (1, 400), "poor": (1, 200)}
    assert [len(run["curve"]) for run in bundle["runs"]] == [4, 5]
    with pytest.raises(ValueError, match="same hidden size"):
        select("5m_vs_6m", [coarse, save_run(tmp_path / "wide", [1.0], hidden=16)], tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="--work-dir"):
        select("5m_vs_6m", [tmp_path / "missing"], tmp_path / "x.pt")
