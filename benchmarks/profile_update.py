"""Where one update's time goes: the cost of one kernel launch on this machine, then torch.profiler over a script's
update (as benchmarks/speed.py builds it) with the kernels launched per update and the GPU's busy time per update.

    python benchmarks/profile_update.py --algo omiga --mode cudagraphs --num-seeds 20 [--updates 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import COMPILE_MODES, make_update_step, resolve_device, synthetic_dataset  # noqa: E402

from common.envs import make_env  # noqa: E402


def launch_seconds(device: torch.device, launches: int = 2000) -> float:
    """Seconds per launch of a one-element kernel, the floor of an update that launches many small kernels."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1.0)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(launches):
        x.add_(1.0)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return (time.perf_counter() - start) / launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algo", default="omiga")
    parser.add_argument("--mode", choices=tuple(COMPILE_MODES), default="eager")
    parser.add_argument("--num-seeds", type=int, default=1)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dataset = synthetic_dataset(make_env("Hopper"), device, np.random.default_rng(0))
    step = make_update_step(args.algo, dataset, device, 128, args.num_seeds, args.mode)
    for _ in range(25):
        step()
    print(f"one kernel launch: {launch_seconds(device) * 1e6:.1f} us")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(args.updates):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.updates
    events = profile.key_averages()
    kernels = sum(event.count for event in events if event.device_type == torch.autograd.DeviceType.CUDA)
    busy = sum(event.self_device_time_total for event in events if event.device_type == torch.autograd.DeviceType.CUDA)
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    print(f"{args.algo} {args.mode} K={args.num_seeds}: {seconds * 1e3:.2f} ms per update under the profiler, "
          f"{kernels / args.updates:.0f} GPU kernels per update, GPU busy {busy / args.updates / 1e3:.2f} ms per update")


if __name__ == "__main__":
    main()
