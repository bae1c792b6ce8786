"""A mutation check anyone can run (not part of CI): one-line changes to a script's losses and update, each run against
the script's own test file, to show which tests see which term.

    python tests/mutants.py omiga                 # every mutant of omiga.py: killed / survived, and by which test
    python tests/mutants.py omcda --only no-done  # one mutant
    python tests/mutants.py --list                # the mutants of every script, without running anything

Each mutant replaces one exact piece of the script's text, which must occur exactly once (a mutant that no longer
applies is an error, so the list follows the code; tests/test_mutants.py checks this in CI). The tests run on a copy
of the repository's tracked files in a temporary directory, one thread, stopping at the first failure, so the work
tree is never touched. Every new loss line should get a mutant here.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    original: str
    replacement: str


# The soft-value lines omiga.py and omcda.py share (OMIGA's V, Q and policy losses and their targets).
SOFT_VALUE = [
    Mutant("no-done", "rewards + gamma * (1.0 - dones) * next_v_tot", "rewards + gamma * next_v_tot"),
    Mutant("no-gamma", "rewards + gamma * (1.0 - dones) * next_v_tot", "rewards + (1.0 - dones) * next_v_tot"),
    Mutant("policy-loss-sign", "return -(weight * log_prob).mean(-1).sum(-1)",
           "return (weight * log_prob).mean(-1).sum(-1)"),
    Mutant("online-next-v", "mix(next_w, agents.v_target(batch.next_obs), next_b)",
           "mix(next_w, agents.v(batch.next_obs).detach(), next_b)"),
    Mutant("online-w-in-z", "w_target, _ = agents.mixer_target(batch.states)",
           "w_target, _ = [x.detach() for x in agents.mixer(batch.states)]"),
    Mutant("frozen-v-target", "    soft_update(agents.v_target, agents.v, args.tau)\n", "\n"),
]

OMIGA = SOFT_VALUE + [
    Mutant("value-loss-sign", "torch.exp(z - c) + torch.exp(-c) * w * v / alpha",
           "torch.exp(z - c) - torch.exp(-c) * w * v / alpha"),
    Mutant("no-shift-tracking", "    track_shift(agents.value_shift, z, args.tau)\n", "\n"),
    Mutant("no-mix-bias", "return (w * values).sum(-2) + b", "return (w * values).sum(-2)"),
    Mutant("minibatch-shift", "c = torch.maximum(shift, z.detach().max(-1).values - EXP_HEADROOM)[..., None]",
           "c = z.detach().max(-1).values[..., None]"),
    Mutant("no-z-clamp", "weight = torch.exp(z.detach().clamp(-z_clip, z_clip))", "weight = torch.exp(z.detach())"),
    Mutant("online-q-in-z", "q_target = agents.q_target(batch.obs, batch.actions)",
           "q_target = agents.q(batch.obs, batch.actions).detach()"),
    Mutant("frozen-mixer-target", "    soft_update(agents.mixer_target, agents.mixer, args.tau)\n", "\n"),
]

OMCDA = SOFT_VALUE + [
    Mutant("value-target-at-data-action", "loss_v = (v - v_soft_target).pow(2)", "loss_v = (v - q_target).pow(2)"),
    Mutant("value-target-unweighted-by-behaviour", "log_tilt = log_weights + scale[..., None, :] * q",
           "log_tilt = scale[..., None, :] * q"),
    Mutant("value-target-mean-not-log-mean-exp", "v_soft = torch.logsumexp(log_tilt, -2) / scale",
           "v_soft = (torch.softmax(log_weights + 0 * q, -2) * q).sum(-2)"),
    Mutant("value-target-online-q", "q = agents.q_target(obs, actions)", "q = agents.q(obs, actions).detach()"),
    Mutant("exp-value-loss", "loss_v = (v - v_soft_target).pow(2).mean(-1).sum(-1)",
           "loss_v = (torch.exp(w_target * (q_target - v) / alpha - 5.0) + math.exp(-5.0) * w_target * v / alpha)"
           ".mean(-1).sum(-1)"),
    Mutant("reward-value-target-at-data-action", "loss_v_reward = (v_reward - v_reward_target)",
           "loss_v_reward = (v_reward - q_reward_target)"),
    Mutant("reward-value-target-untilted", "(torch.softmax(log_tilt, -2) * q_reward)",
           "(torch.softmax(log_tilt * 0, -2) * q_reward)"),
    Mutant("reward-value-target-online", "q_reward = agents.q_reward_target(obs, actions)",
           "q_reward = agents.q_reward(obs, actions).detach()"),
    Mutant("state-kl-unweighted", "return (torch.exp(z) * (z - state_kl).pow(2))", "return ((z - state_kl).pow(2))"),
    Mutant("kl-without-normaliser", "(torch.softmax(z, -1) * z).sum(-1) - (torch.logsumexp(z, -1) - math.log(z.shape[-1]))",
           "(torch.softmax(z, -1) * z).sum(-1)"),
    Mutant("influence-uncentred", "centred = z - state_kl", "centred = z"),
    Mutant("influence-from-soft-critic", "reward_part = w_reward_target * (q_reward_target - v_reward.detach()) / alpha",
           "reward_part = z"),
    Mutant("influence-without-alpha", "return alpha * moments[..., 0, :] / moments[..., 1, :]",
           "return moments[..., 0, :] / moments[..., 1, :]"),
    Mutant("alpha-step-sign", "(log_alpha * (budget - kl).detach())", "(log_alpha * (kl - budget).detach())"),
    Mutant("no-kl-smoothing", "agents.kl.lerp_(in_sample_kl(z_clipped), args.estimate_ema)",
           "agents.kl.copy_(in_sample_kl(z_clipped))"),
    Mutant("no-moment-smoothing",
           "agents.influence_moments.lerp_(influence_moments(reward_part, z_clipped, state_kl), args.estimate_ema)",
           "agents.influence_moments.copy_(influence_moments(reward_part, z_clipped, state_kl))"),
    Mutant("no-z-clamp", "weight = torch.exp(z.detach().clamp(-z_clip, z_clip))\n    return -(weight * log_prob)",
           "weight = torch.exp(z.detach())\n    return -(weight * log_prob)"),
    Mutant("policy-not-from-behaviour", "    agents.policy.load_state_dict(agents.behaviour.state_dict())\n", "\n"),
    Mutant("online-next-v-reward", "mix(next_w_reward, agents.v_reward_target(batch.next_obs), next_b_reward)",
           "mix(next_w_reward, agents.v_reward(batch.next_obs).detach(), next_b_reward)"),
    Mutant("frozen-reward-mixer-target", "    soft_update(agents.mixer_reward_target, agents.mixer_reward, args.tau)\n",
           "\n"),
]

CQL_MA = [
    Mutant("no-done", "target = rewards + gamma * (1.0 - dones) * next_q_tot", "target = rewards + gamma * next_q_tot"),
    Mutant("no-gamma", "target = rewards + gamma * (1.0 - dones) * next_q_tot",
           "target = rewards + (1.0 - dones) * next_q_tot"),
    Mutant("no-penalty", "loss_cql = conservative_penalty(q_tot_all[1:], log_density, q_tot)",
           "loss_cql = 0.0 * conservative_penalty(q_tot_all[1:], log_density, q_tot)"),
    Mutant("online-next-q", "mix(next_w, agents.q_target(batch.next_obs, next_actions), next_b)\n        # Proposals",
           "mix(next_w, agents.q(batch.next_obs, next_actions).detach(), next_b)\n        # Proposals"),
]

ICQ = [
    Mutant("terminals-bootstrap", "rho = batch_softmax_weights(next_q_tot, alpha, live=dones == 0)",
           "rho = batch_softmax_weights(next_q_tot, alpha, live=torch.ones_like(dones, dtype=torch.bool))"),
    Mutant("no-gamma", "return rewards + gamma * rho * next_q_tot, rho", "return rewards + rho * next_q_tot, rho"),
    Mutant("uniform-target-weights", "return rewards + gamma * rho * next_q_tot, rho",
           "return rewards + gamma * (dones == 0) * next_q_tot, rho"),
    Mutant("policy-weights-uniform",
           "policy_weights = batch_softmax_weights(w.detach() * q_twins.detach().min(-3).values, args.beta)",
           "policy_weights = torch.ones_like(q_twins[..., 0, :, :]).detach()"),
]

COMADICE = [
    Mutant("no-done-in-q", "td_residual = rewards + gamma * (1.0 - dones) * next_nu_tot.detach() - nu_tot",
           "td_residual = rewards + gamma * next_nu_tot.detach() - nu_tot"),
    Mutant("no-done-in-nu", "return advantage_tot + gamma * (1.0 - dones) * (next_nu_tot - next_nu_tot.detach())",
           "return advantage_tot + gamma * (next_nu_tot - next_nu_tot.detach())"),
    Mutant("no-flow-in", "return advantage_tot + gamma * (1.0 - dones) * (next_nu_tot - next_nu_tot.detach())",
           "return advantage_tot"),
    Mutant("no-initial-term", "return (1.0 - gamma) * initial_nu_tot.mean(-1) + alpha",
           "return 0.0 * initial_nu_tot.mean(-1) + alpha"),
    Mutant("policy-unweighted", "loss_pi = policy_loss(agents.policy.log_prob(batch.obs, batch.actions, batch.avail), weight)",
           "loss_pi = policy_loss(agents.policy.log_prob(batch.obs, batch.actions, batch.avail), torch.ones_like(weight))"),
]

CFCQL = [
    Mutant("no-done", "target = rewards + gamma * (1.0 - dones) * next_q_tot", "target = rewards + gamma * next_q_tot"),
    Mutant("no-gamma", "target = rewards + gamma * (1.0 - dones) * next_q_tot",
           "target = rewards + (1.0 - dones) * next_q_tot"),
    Mutant("no-penalty", "loss_cql = counterfactual_penalty(cf_q_tot, log_density, q_tot, weights)",
           "loss_cql = 0.0 * counterfactual_penalty(cf_q_tot, log_density, q_tot, weights)"),
    Mutant("no-importance-density", "return torch.logsumexp(values - log_density, 0)", "return torch.logsumexp(values, 0)"),
    Mutant("swap-unmixed", "(q_tot + w[:, None] * (q[:, 1:] - q[:, :1]))", "(q_tot + (q[:, 1:] - q[:, :1]))"),
    Mutant("weights-against-kl", "behaviour_log_prob)).sum(0)\n    return torch.softmax(tau * kl, 0)",
           "behaviour_log_prob)).sum(0)\n    return torch.softmax(-tau * kl, 0)"),
    Mutant("policy-loss-sign", "return (entropy_alpha * log_prob.sum(0) - q_tot).mean()",
           "return (entropy_alpha * log_prob.sum(0) + q_tot).mean()"),
    Mutant("online-next-q", "mix(next_w, agents.q_target(batch.next_obs, next_actions), next_b)\n        # Each agent's",
           "mix(next_w, agents.q(batch.next_obs, next_actions).detach(), next_b)\n        # Each agent's"),
]

BC = [
    Mutant("policy-loss-sign", "return -log_prob.mean(1).sum()", "return log_prob.mean(1).sum()"),
    Mutant("no-tanh-jacobian", "return (gaussian - torch.log1p(-actions.pow(2))).sum(-1)", "return gaussian.sum(-1)"),
    Mutant("std-not-learned", "- log_std - 0.5 * math.log(2 * math.pi)", "- 0.5 * math.log(2 * math.pi)"),
]

OMAR = [
    Mutant("no-done", "target = rewards + gamma * (1.0 - dones) * next_q\n", "target = rewards + gamma * next_q\n"),
    Mutant("no-gamma", "target = rewards + gamma * (1.0 - dones) * next_q\n", "target = rewards + (1.0 - dones) * next_q\n"),
    Mutant("max-of-target-critics", "return torch.min(*(critic(next_obs, next_actions) for critic in agents.q_target))",
           "return torch.max(*(critic(next_obs, next_actions) for critic in agents.q_target))"),
    Mutant("online-next-policy", "next_actions = agents.policy_target.act(next_obs)", "next_actions = agents.policy.act(next_obs)"),
    Mutant("no-penalty", "loss_cql = sum(conservative_penalty(q[:, 1:].transpose(0, 1), log_density, q[:, 0]) for q in qs)",
           "loss_cql = 0.0 * sum(conservative_penalty(q[:, 1:].transpose(0, 1), log_density, q[:, 0]) for q in qs)"),
    Mutant("no-importance-density", "return torch.logsumexp(values - log_density, 0) - math.log(values.shape[0])",
           "return torch.logsumexp(values, 0) - math.log(values.shape[0])"),
    Mutant("rectify-towards-the-worse", "torch.where((policy_q >= sampled_q)[..., None], policy_actions, sampled_actions)",
           "torch.where((policy_q < sampled_q)[..., None], policy_actions, sampled_actions)"),
    Mutant("policy-q-sign", "omar_coe * rectification - (1.0 - omar_coe) * q + action_l2",
           "omar_coe * rectification + (1.0 - omar_coe) * q + action_l2"),
]

BCQ_MA = [
    Mutant("no-done", "args.candidates, args.soft_clip)\n        target = batch.rewards + args.gamma * (1.0 - batch.dones) * next_value",
           "args.candidates, args.soft_clip)\n        target = batch.rewards + args.gamma * next_value"),
    Mutant("no-gamma", "args.candidates, args.soft_clip)\n        target = batch.rewards + args.gamma * (1.0 - batch.dones) * next_value",
           "args.candidates, args.soft_clip)\n        target = batch.rewards + (1.0 - batch.dones) * next_value"),
    Mutant("soft-clip-swapped", "return soft_clip * torch.minimum(q1, q2) + (1.0 - soft_clip) * torch.maximum(q1, q2)",
           "return soft_clip * torch.maximum(q1, q2) + (1.0 - soft_clip) * torch.minimum(q1, q2)"),
    Mutant("candidate-mean-not-max", "return values.unflatten(1, (obs.shape[1], candidates)).max(-1).values",
           "return values.unflatten(1, (obs.shape[1], candidates)).mean(-1)"),
    Mutant("vae-without-kl", "return (reconstruction + kl_weight * kl).sum()", "return reconstruction.sum()"),
    Mutant("td-unweighted", "return (weight * (q - target).pow(2)).mean(-1).sum()", "return ((q - target).pow(2)).mean(-1).sum()"),
    Mutant("perturbation-loss-sign", "return -(weight * perturbed_q).mean(-1).sum()", "return (weight * perturbed_q).mean(-1).sum()"),
    Mutant("frozen-critic-target", "    soft_update(agents.critic_target, agents.critic, args.tau)\n    soft_update(agents.perturbation_target, agents.perturbation, args.tau)\n    metrics.update(",
           "    soft_update(agents.perturbation_target, agents.perturbation, args.tau)\n    metrics.update("),
]

MUTANTS: dict[str, list[Mutant]] = {"omiga": OMIGA, "omcda": OMCDA, "cql_ma": CQL_MA, "cfcql": CFCQL, "icq": ICQ,
                                    "comadice": COMADICE, "bc": BC, "omar": OMAR, "bcq_ma": BCQ_MA}


def check_applies(script: str, mutant: Mutant, text: str) -> None:
    count = text.count(mutant.original)
    if count != 1:
        raise SystemExit(f"mutants.py: error: {script}.py mutant {mutant.name!r}: its original text occurs {count} "
                         f"times (must be once): {mutant.original!r}")


def copy_tracked_files(destination: Path) -> None:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)


def run_tests(copy: Path, test_file: str, timeout: int) -> tuple[bool, str, float]:
    """(passed, the first failing test or the reason, seconds)."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test_file]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        finished = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout} s", time.perf_counter() - started
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", finished.stdout, re.MULTILINE)
    lines = finished.stdout.strip().splitlines()
    reason = failed.group(1).split("::", 1)[-1] if failed else (lines[-1] if lines else "no output")
    return finished.returncode == 0, reason, time.perf_counter() - started


def check_script(script: str, only: str | None, timeout: int) -> int:
    """Print the script's mutation table (markdown); 1 if a mutant survived, else 0."""
    text = (REPO / f"{script}.py").read_text()
    mutants = [m for m in MUTANTS[script] if only is None or m.name == only]
    if not mutants:
        raise SystemExit(f"mutants.py: error: {script}.py has no mutant {only!r}")
    for mutant in mutants:
        check_applies(script, mutant, text)
    test_file = f"tests/test_{script}.py"
    survived = 0
    with tempfile.TemporaryDirectory(prefix=f"mutants-{script}-") as tmp:
        copy = Path(tmp)
        copy_tracked_files(copy)
        passed, reason, seconds = run_tests(copy, test_file, timeout)
        if not passed:
            raise SystemExit(f"mutants.py: error: {test_file} fails without a mutant ({reason}); fix that first")
        print(f"{script}.py against {test_file} (unmutated: passes in {seconds:.0f} s)\n")
        print("| mutant | result | killed by | seconds |\n| --- | --- | --- | ---: |", flush=True)
        for mutant in mutants:
            (copy / f"{script}.py").write_text(text.replace(mutant.original, mutant.replacement))
            passed, reason, seconds = run_tests(copy, test_file, timeout)
            survived += passed
            print(f"| {mutant.name} | {'SURVIVED' if passed else 'killed'} | {'' if passed else reason} | "
                  f"{seconds:.0f} |", flush=True)
    return int(survived > 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scripts", nargs="*", metavar="SCRIPT", help=f"scripts to mutate: {', '.join(MUTANTS)}")
    parser.add_argument("--only", help="run only the mutant of this name")
    parser.add_argument("--list", action="store_true", help="list the mutants and check that each applies")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds for one run of a test file")
    args = parser.parse_args(argv)
    if args.list:
        for script, mutants in MUTANTS.items():
            text = (REPO / f"{script}.py").read_text()
            for mutant in mutants:
                check_applies(script, mutant, text)
                print(f"{script}: {mutant.name}")
        return 0
    unknown = [script for script in args.scripts if script not in MUTANTS]
    if unknown or not args.scripts:
        parser.error(f"name scripts among {', '.join(MUTANTS)}, or --list" + (f" (not {', '.join(unknown)})" if unknown else ""))
    return max(check_script(script, args.only, args.timeout) for script in args.scripts)


if __name__ == "__main__":
    sys.exit(main())
