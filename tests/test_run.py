"""The run machinery's choices that hold on any machine: where the update is captured as a CUDA graph (by default on
CUDA, never on a CPU), which optimizers keep their step counters on the device, and which scripts offer the flags."""

import dataclasses
import importlib

import pytest
import torch

import omiga
from common.run import capture_graph, captures_graph, compile_update


def test_the_update_is_captured_by_default_on_cuda_and_never_on_a_cpu():
    args = omiga.Args()
    assert captures_graph(args, torch.device("cuda"))
    assert not captures_graph(dataclasses.replace(args, cuda_graph=False), torch.device("cuda"))
    assert not captures_graph(args, torch.device("cpu"))
    assert compile_update(omiga.update, args, torch.device("cpu")) is omiga.update
    assert compile_update(omiga.update, dataclasses.replace(args, cuda_graph=False), torch.device("cuda")) is omiga.update
    captured = compile_update(omiga.update, args, torch.device("cuda"))  # recorded at its first call, not here
    assert captured.__qualname__ == capture_graph(omiga.update).__qualname__


def test_optimizers_are_capturable_exactly_when_the_update_is_captured():
    args = dataclasses.replace(omiga.Args(), hidden_dim=8, mixer_hidden_dim=8)
    agents = omiga.Agents(3, 5, 1, 7, args)
    assert not any(group["capturable"] for optimizer in omiga.make_optimizers(agents, args).values()
                   for group in optimizer.param_groups)


@pytest.mark.parametrize("script, offers", [("omiga", True), ("omcda", True), ("icq", True), ("comadice", True),
                                            ("bc", False), ("cql_ma", False), ("cfcql", False), ("omar", False),
                                            ("bcq_ma", False)])
def test_fused_seed_and_graph_flags_are_offered_only_where_they_work(script, offers):
    """tyro builds --help from Args: the single-seed scripts, whose update has no seed dimension and syncs with the
    host, have no --num-seeds, --cuda-graph or --compile to refuse."""
    names = {field.name for field in dataclasses.fields(importlib.import_module(script).Args)}
    assert all((name in names) == offers for name in ("num_seeds", "cuda_graph", "compile"))
