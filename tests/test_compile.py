"""On a GPU the update captured as one CUDA graph (the default), and with --compile torch.compile inside it, trains
like the eager update (--no-cuda-graph): same minibatches, same weights after a few updates to float tolerance. Needs
CUDA: skipped on CPU-only machines, where torch.compile alone takes minutes per script."""

import dataclasses
import importlib

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("algo", ["omiga", "omcda", "comadice", "icq"])
@pytest.mark.parametrize("seeds", [1, 3])
def test_compiled_graph_trains_like_eager(algo, seeds):
    from benchmarks.speed import synthetic_dataset
    from common.envs import make_env
    from common.run import compile_update

    script = importlib.import_module(algo)
    device = torch.device("cuda")
    dataset = synthetic_dataset(make_env("Hopper"), device, np.random.default_rng(0))
    runs = []
    for graph, compiled in ((False, False), (True, False), (True, True)):
        args = dataclasses.replace(script.Args(), num_seeds=seeds, cuda_graph=graph, compile=compiled, hidden_dim=64)
        torch.manual_seed(0)
        agents = script.Agents(dataset.n_agents, dataset.obs_dim, dataset.act_dim, dataset.state_dim, args).to(device)
        optimizers = script.make_optimizers(agents, args)
        generators = [torch.Generator(device=device).manual_seed(k) for k in range(seeds)]
        if algo == "omcda":
            script.pretrain_behaviour(agents, dataset, dataclasses.replace(args, bc_steps=20), generators)
        update = compile_update(script.update, args, device)
        def minibatches() -> list:
            sampler = script.NextActionSampler(dataset) if algo == "icq" else dataset
            batches = [script.sample_batch(dataset, args.batch_size, args.behaviour_samples, generators)
                       if algo == "omcda" else sampler.sample(args.batch_size, generators)]
            if algo == "comadice":
                batches.append(script.sample_initial_states(dataset, args.batch_size, generators))
            return batches

        losses = [update(agents, optimizers, *minibatches(), args)["losses/policy"].clone() for _ in range(8)]
        runs.append((agents.state_dict(), torch.stack(losses)))
    (eager, eager_losses), *captured = runs
    for weights, losses in captured:
        torch.testing.assert_close(losses, eager_losses, rtol=1e-3, atol=1e-4)
        for name, value in eager.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-3, atol=1e-4, msg=name)
