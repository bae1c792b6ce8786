"""benchmarks/: report.py's numbers and intervals on synthetic runs and the README's results block, run.py's grid,
resuming and failures, speed.py's table, allocation.py's per-agent table and rank correlation."""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import submitit
from torch.utils.tensorboard import SummaryWriter

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import allocation  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import speed  # noqa: E402

TINY_RUN = ["--", "--total-steps", "10", "--eval-every", "5", "--eval-episodes", "1", "--final-eval-episodes", "1",
            "--log-every", "5", "--hidden-dim", "16", "--no-generate"]
CARD = dict(file="data/Hopper-3x1-medium-replay.hdf5", transitions=600, episodes=27, return_mean=16.4, return_std=13.2,
            return_min=4.8, return_max=64.3, source="tests")


def write_result(root, algo, seed, evals, dataset="medium-replay", finished=True, written_at=1_700_000_000.0,
                 device="Test CPU (2 cores)", updates_per_sec=50.0, env="Hopper", card=CARD):
    """A run directory's result.json as the scripts write it, with evaluations at (step, mean) or, on SMAX maps,
    (step, mean, win rate)."""
    run_dir = root / f"{env}__{dataset}__{algo}__{seed}__{int(written_at)}"
    run_dir.mkdir(parents=True)
    evaluations = [dict(step=step, mean=mean, std=1.0, episodes=10, **({"win_rate": rest[0]} if rest else {}))
                   for step, mean, *rest in evals]
    args = dict(env=env, agent_conf=None, dataset=dataset, exp_name=algo, seed=seed, total_steps=evals[-1][0])
    result = dict(args=args, commit="abc123", device=device, dataset=card, evaluations=evaluations,
                  last=evaluations[-1], best=max(evaluations, key=lambda e: e["mean"]),
                  updates_per_sec=updates_per_sec, finished=finished, written_at=written_at)
    (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir


def section(text, heading):
    """The part of a report under `## heading`, up to the next heading."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def interval(cell):
    """`mean [low, high] n=k` -> (mean, low, high, k)."""
    mean, low, high, n = re.fullmatch(r"(\S+) \[(\S+), (\S+)\] n=(\d+)", cell).groups()
    return float(mean), float(low), float(high), int(n)


def table(text, title):
    """The markdown table under the line starting with `title`, as {first column: {header: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return {row[0]: dict(zip(header, row)) for row in body}


def test_report_averages_last_and_best_evaluation_over_seeds_with_intervals(tmp_path):
    runs = tmp_path / "runs"
    # omiga, medium-replay: last evals 100, 200, 300; best evals 150, 200, 400.
    write_result(runs, "omiga", 0, [(50, 150.0), (100, 100.0)], written_at=2_000_000_000.0)
    write_result(runs, "omiga", 0, [(50, 999.0), (100, 999.0)], written_at=1_000_000_000.0)  # older: ignored
    write_result(runs, "omiga", 1, [(50, 50.0), (100, 200.0)], updates_per_sec=70.0)
    write_result(runs, "omiga", 2, [(50, 400.0), (100, 300.0)], device="Test GPU")
    write_result(runs, "icq", 0, [(50, 10.0)], finished=False)  # stopped before its final evaluation
    write_result(runs, "icq", 0, [(100, 10.0)], dataset="expert")
    out = tmp_path / "results.md"

    report.main([str(runs), "--out", str(out)])

    text = out.read_text()
    grid = section(text, "Hopper 3x1, 100 updates")
    last = table(grid, "**Last evaluation**")
    best = table(grid, "**Best evaluation**")
    assert list(last) == ["expert", "medium-replay"]  # rows in the order of common.datasets.QUALITIES
    assert list(last["medium-replay"])[-2:] == ["omiga", "icq"]  # columns in run.ALGOS order
    # of the 27 equally likely resamples of (100, 200, 300), one has mean 100 and one 300: 3.7 % each, more than
    # the 2.5 % in each tail, so the 95 % interval is [100, 300]
    assert last["medium-replay"]["omiga"] == "200 [100, 300] n=3"
    mean, low, high, n = interval(best["medium-replay"]["omiga"])
    assert (mean, n) == (250, 3) and 150 <= low < 250 < high <= 400
    assert last["medium-replay"]["icq"] == "—"
    assert last["expert"]["icq"] == "10 n=1" and last["expert"]["omiga"] == "—"  # one seed: no interval
    assert last["medium-replay"]["transitions"] == "600"  # the card of the dataset the runs trained on
    assert "- device: Test CPU (2 cores); updates/s (median over runs, evaluations excluded): omiga 60, icq 50" in text
    assert "- device: Test GPU; updates/s (median over runs, evaluations excluded): omiga 50" in text
    assert "- commit: abc123" in text
    assert re.search(r"Unfinished runs.*\n\n- `.*Hopper__medium-replay__icq__0__1700000000`: last evaluation at "
                     r"step 50 of 50", text)
    assert "**Published, Hopper 3x1**" not in text and "## Published: Hopper 3x1" in text
    assert "| medium-replay | 746.42 | 16.4 | 1733.27 ± 379.71 | 774.18 ± 494.27 |" in text  # theirs beside our data
    report.main([str(runs), "--out", str(out)])
    assert out.read_text() == text  # seeded bootstrap: the same report twice


def test_budgets_get_separate_tables(tmp_path):
    runs = tmp_path / "runs"
    write_result(runs, "omiga", 0, [(100, 10.0)])
    write_result(runs, "omiga", 1, [(100, 30.0)])
    write_result(runs, "omiga", 2, [(50, 500.0), (200, 900.0)])  # twice the budget
    write_result(runs, "icq", 0, [(200, 700.0)])
    text = report.write_report(runs, tmp_path / "results.md", "test")
    short, long = section(text, "Hopper 3x1, 100 updates"), section(text, "Hopper 3x1, 200 updates")
    assert table(short, "**Last evaluation**")["medium-replay"]["omiga"].endswith("n=2")
    assert "icq" not in table(short, "**Last evaluation**")["medium-replay"]
    assert table(long, "**Last evaluation**")["medium-replay"]["omiga"] == "900 n=1"
    assert table(long, "**Last evaluation**")["medium-replay"]["icq"] == "700 n=1"
    assert (tmp_path / "curves" / "Hopper-3x1-medium-replay-100.png").exists()
    assert (tmp_path / "curves" / "Hopper-3x1-medium-replay-200.png").exists()


def test_iqm_and_probability_of_improvement_by_hand():
    assert report.iqm([np.array([1.0, 8.0, 3.0]), np.array([5.0, 2.0, 7.0, 4.0, 6.0])]) == 4.5  # mean of 3..6
    assert report.iqm([np.array([1.0, 2.0, 99.0])]) == 34.0  # fewer than four scores: none cut
    x, y = [np.array([1.0, 3.0]), np.array([5.0])], [np.array([2.0]), np.array([5.0, 4.0])]
    # dataset 1: 1 < 2, 3 > 2 -> 0.5; dataset 2: 5 = 5 counts half, 5 > 4 -> 0.75; mean 0.625
    assert report.probability_of_improvement(x, y) == 0.625
    assert report.probability_of_improvement(y, x) == 1 - 0.625


def test_stratified_bootstrap_resamples_within_each_dataset():
    """Two datasets far apart: a resample keeps two runs of each, so the IQM (mean of the middle two of four) stays
    within [50, 51]; pooling the runs across datasets would draw resamples of one dataset only (IQM near 0 or 100)."""
    per_dataset = [np.array([0.0, 1.0]), np.array([100.0, 101.0])]
    low, high = report.stratified_bootstrap_ci(report.iqm, per_dataset)
    assert 50 <= low < high <= 51
    assert report.stratified_bootstrap_ci(report.iqm, [np.array([3.0]), np.array([4.0])]) is None  # one run each
    # P(X > Y) with X's runs all above Y's on one dataset and all below on the other: 0.5 in every resample
    low, high = report.stratified_bootstrap_ci(report.probability_of_improvement, [np.array([9.0, 8.0]),
                                               np.array([0.0, 1.0])], [np.array([1.0, 2.0]), np.array([5.0, 6.0])])
    assert low == high == 0.5


def test_bootstrap_interval_of_the_mean_matches_the_exact_one():
    values = np.array([3.0, 10.0, 4.0, 8.0])
    exact = np.percentile([np.mean(draw) for draw in itertools.product(values, repeat=4)], [2.5, 97.5],
                          method="inverted_cdf")  # all 256 equally likely resamples
    assert np.allclose(report.bootstrap_mean_ci(values), exact, atol=0.3)  # exact: [3.5, 9.0]


def test_readme_results_block_is_what_report_builds_from_the_committed_results():
    """The README's results block is generated: if this fails, run `python benchmarks/report.py` (and commit
    README.md), or fix report.py rather than the README."""
    records = report.latest_finished_per_seed(report.load_results(report.RESULTS_DIR))
    readme = report.README.read_text()
    block = re.search(re.escape(report.BLOCK_BEGIN) + ".*?" + re.escape(report.BLOCK_END), readme, re.S)
    assert block, "README.md has no results block"
    assert block[0] == report.readme_block(records)


def test_replace_block_and_text_without_markers():
    text = f"intro\n{report.BLOCK_BEGIN}\nold\n{report.BLOCK_END}\nrest\n"
    new = f"{report.BLOCK_BEGIN}\nnew\n{report.BLOCK_END}"
    assert report.replace_block(text, new) == f"intro\n{new}\nrest\n"
    with pytest.raises(ValueError, match="expected one results block"):
        report.replace_block("no markers", new)


def test_collect_copies_finished_runs_into_the_results_layout(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    write_result(runs / "a", "omiga", 0, [(100, 1.0)], written_at=1_000.0)
    write_result(runs / "b", "omiga", 0, [(100, 2.0)], written_at=2_000.0)  # the same cell, written later
    write_result(runs, "icq", 3, [(50, 3.0)], finished=False)
    write_result(runs / "c", "omiga", 0, [(100, 2.5), (300, 4.0)], written_at=3_000.0)  # the same seed, a longer run
    cell = results / "Hopper-3x1" / "medium-replay" / "omiga"
    assert sorted(report.collect(runs, results)) == [cell / "100_updates" / "seed_0" / "result.json",
                                                     cell / "300_updates" / "seed_0" / "result.json"]
    assert json.loads((cell / "100_updates" / "seed_0" / "result.json").read_text())["last"]["mean"] == 2.0
    assert report.collect(runs / "a", results) == []  # an older result does not replace a newer copy


def test_smax_runs_get_their_map_table_with_win_rates(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    card = dict(CARD, file="data/5m_vs_6m-good.hdf5", win_rate=0.05)
    write_result(runs, "omiga", 1, [(50, 5.0, 0.1), (100, 6.0, 0.25)], dataset="good", env="5m_vs_6m", card=card)
    write_result(runs, "omiga", 2, [(50, 5.0, 0.0), (100, 8.0, 0.75)], dataset="good", env="5m_vs_6m", card=card)
    write_result(runs, "bc", 1, [(100, 4.0, 0.0)], dataset="poor", env="5m_vs_6m", card=card)
    write_result(runs, "bc", 1, [(100, 5.0, 0.0)], dataset="medium", env="5m_vs_6m", card=card)
    write_result(runs, "omiga", 1, [(100, 300.0)])  # a MuJoCo run: no win rates in its table
    report.collect(runs, results)
    assert (results / "5m_vs_6m" / "good" / "omiga" / "100_updates" / "seed_2" / "result.json").exists()
    text = report.write_report(results, tmp_path / "results.md", "test")
    sections = {part.splitlines()[0]: part for part in text.split("\n## ")[1:]}
    smax = sections["5m_vs_6m, 100 updates"]
    # the bootstrap means of two seeds are 6, 7 or 8, each end with probability 1/4: the interval is [6, 8]
    assert table(smax, "**Last evaluation**")["good"]["omiga"] == "7.00 [6.00, 8.00] n=2"
    assert table(smax, "**Last evaluation**")["good"]["dataset return"] == "16.4 ± 13.2 (win rate 0.05)"
    wins = table(smax, "**Win rate**")
    assert wins["good"]["omiga"] == "0.50 [0.25, 0.75] n=2" and wins["poor"]["bc"] == "0.00 n=1"
    assert wins["good"]["bc"] == "—"
    assert list(wins) == ["good", "medium", "poor"]  # the seeds' order, each once
    hopper = sections["Hopper 3x1, 100 updates"]
    assert "**Last evaluation**" in hopper and "**Win rate**" not in hopper
    assert "updates/s on 5m_vs_6m (median over runs, evaluations excluded): omiga 50, bc 50" in text  # per map


def test_report_without_runs_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        report.main([str(tmp_path), "--out", str(tmp_path / "results.md")])
    assert stopped.value.code == 2
    assert f"report.py: error: no finished runs under {tmp_path}" in capsys.readouterr().err


def test_malformed_result_files_are_named_and_skipped_by_report_collect_and_status(tmp_path, capsys):
    """A truncated file, a JSON that is not a result, one without args.seed: each gets one warning line naming it,
    and the report, --collect and --status go on with the good file."""
    runs = tmp_path / "runs"
    write_result(runs, "omiga", 1, [(100, 5.0)])
    bad = {"truncated": '{"args": {"env": "Hop', "not_a_result": "[1, 2]", "no_seed": json.dumps(
        {"args": {"env": "Hopper", "dataset": "medium", "exp_name": "omiga", "total_steps": 100}, "dataset": {},
         "evaluations": [], "finished": True, "written_at": 1.0})}
    for name, text in bad.items():
        (runs / name).mkdir()
        (runs / name / "result.json").write_text(text)
    assert report.main([str(runs), "--out", str(tmp_path / "results.md")]) in (None, 0)
    assert "5.0" in (tmp_path / "results.md").read_text()
    assert len(report.collect(runs, tmp_path / "results")) == 1
    err = capsys.readouterr().err
    for name in bad:
        assert re.search(rf"^warning: skipping {re.escape(str(runs / name / 'result.json'))}: ", err, re.MULTILINE)
    cell = tmp_path / "grid" / "Hopper__medium__omiga__1"
    (cell / "runs" / "x").mkdir(parents=True)
    (cell / "runs" / "x" / "result.json").write_text("{")
    assert run.main(["--status", "--algos", "omiga", "--datasets", "medium", "--seeds", "1",
                     "--runs-dir", str(tmp_path / "grid")]) == 0
    assert "not started" in capsys.readouterr().out


def test_dry_run_lists_the_grid_and_runs_nothing(tmp_path, tiny_hopper_dir, capsys):
    runs_dir = tmp_path / "grid"
    assert run.main(["--algos", "omiga", "icq", "--datasets", "expert", "medium-replay", "--seeds", "0", "1",
                     "--runs-dir", str(runs_dir), "--data-dir", str(tiny_hopper_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^run +(\S+)$", out, re.M)
    assert len(listed) == 8 and "Hopper__expert__icq__1" in listed
    assert f"would generate {tiny_hopper_dir / 'Hopper-3x1-expert.hdf5'}" in out
    assert "Hopper-3x1-medium-replay" not in out  # that file exists
    assert not runs_dir.exists()


def test_unknown_names_and_grid_flags_after_the_separator_are_refused(capsys):
    with pytest.raises(SystemExit):
        run.main(["--algos", "omgia", "--dry-run"])
    assert "invalid choice: 'omgia' (choose from 'omcda', 'omiga', 'icq', 'comadice', 'bc', 'cql_ma', 'cfcql', 'omar', 'bcq_ma')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--dry-run", "--", "--seed", "3"])
    assert "--seed after -- is set by run.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--dry-run", "--launcher", "slurm", "--time", "0"])
    assert "--time must be at least 1" in capsys.readouterr().err


def test_slurm_launcher_asks_for_the_partition_time_gpus_and_array_parallelism(tmp_path, monkeypatch):
    fake_slurm = tmp_path / "bin"
    fake_slurm.mkdir()
    (fake_slurm / "srun").write_text("#!/bin/sh\n")
    (fake_slurm / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_slurm}{os.pathsep}{os.environ['PATH']}")  # submitit looks for srun
    args, _ = run.parse_args(["--launcher", "slurm", "--partition", "gpu", "--time", "90", "--gpus-per-job", "2",
                              "--array-parallelism", "4", "--runs-dir", str(tmp_path)])
    executor = run.make_executor(args)
    assert isinstance(executor._executor, submitit.SlurmExecutor)
    script = executor._executor._make_submission_file_text("python job.py", "uid")
    for directive in ("--partition=gpu", "--time=90", "--gpus-per-node=2"):
        assert f"#SBATCH {directive}" in script, script
    assert executor._executor.parameters["array_parallelism"] == 4


def test_tiny_grid_through_submitit_resumes_skips_and_reports(tmp_path, tiny_hopper_dir, capsys):
    """Two algorithms through the local executor; then one cell is made unfinished as if its job had been stopped
    after its checkpoint at update 10, and a longer grid resumes it, skips the other, and report.py --collect turns
    the results into a table and a learning-curve PNG."""
    grid = ["--algos", "omiga", "bc", "--datasets", "medium-replay", "--seeds", "0", "--workers", "2",
            "--runs-dir", str(tmp_path / "grid"), "--data-dir", str(tiny_hopper_dir)]
    assert run.main([*grid, *TINY_RUN]) == 0, capsys.readouterr()
    assert "finished 2, skipped 0 (already finished), failed 0" in capsys.readouterr().out
    assert list((tmp_path / "grid" / "submitit").glob("*_log.out"))  # submitit ran the jobs
    (omiga_result,) = (tmp_path / "grid" / "Hopper__medium-replay__omiga__0").glob("runs/*/result.json")
    stopped = json.loads(omiga_result.read_text())
    omiga_result.write_text(json.dumps(dict(stopped, finished=False)))

    assert run.main([*grid, *TINY_RUN[:2], "20", *TINY_RUN[3:]]) == 0, capsys.readouterr()
    second = capsys.readouterr().out
    assert re.search(rf"^resume from {omiga_result.parent.name} +Hopper__medium-replay__omiga__0$", second, re.M)
    assert re.search(r"^skip +Hopper__medium-replay__bc__0$", second, re.M)
    assert "finished 1, skipped 1 (already finished), failed 0" in second
    resumed = json.loads(omiga_result.read_text())
    assert resumed["finished"] and [e["step"] for e in resumed["evaluations"]] == [5, 10, 15, 20]
    assert resumed["evaluations"][:2] == stopped["evaluations"]

    results, out = tmp_path / "results", tmp_path / "report" / "results.md"
    report.main([str(results), "--collect", str(tmp_path / "grid"), "--out", str(out)])
    assert len(list(results.rglob("result.json"))) == 2
    text = out.read_text()
    # omiga ran 20 updates and bc 10: two budgets, two tables
    omiga = table(section(text, "Hopper 3x1, 20 updates"), "**Last evaluation**")["medium-replay"]
    mean = resumed["last"]["mean"]
    assert omiga["omiga"] == f"{report.number(mean, report.decimals_for([mean]))} n=1" and "bc" not in omiga
    assert table(section(text, "Hopper 3x1, 10 updates"), "**Last evaluation**")["medium-replay"]["bc"].endswith(
        " n=1")
    png = tmp_path / "report" / "curves" / "Hopper-3x1-medium-replay-20.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](curves/Hopper-3x1-medium-replay-20.png)" in text


def test_a_signal_to_the_grid_stops_its_running_cells_with_checkpoints(tmp_path, tiny_hopper_dir):
    """SIGTERM to run.py reaches the running script (submitit's local jobs do not pass it on), which checkpoints; the
    cell is then resumable and no script is left running."""
    grid = ["--algos", "omiga", "--datasets", "medium-replay", "--seeds", "0", "--workers", "1", "--runs-dir",
            str(tmp_path / "grid"), "--data-dir", str(tiny_hopper_dir), "--", "--no-generate", "--batch-size", "8",
            "--hidden-dim", "16", "--eval-episodes", "1", "--total-steps", "1000000", "--eval-every", "5"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cell = tmp_path / "grid" / "Hopper__medium-replay__omiga__0"
    grid_process = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "run.py"), *grid], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(cell.glob("runs/*/model.pt")):  # the script trains and has checkpointed once
            assert time.monotonic() < deadline and grid_process.poll() is None, grid_process.communicate()
            time.sleep(0.2)
        grid_process.send_signal(signal.SIGTERM)
        out, err = grid_process.communicate(timeout=120)
    finally:  # a failed test leaves nothing training
        if grid_process.poll() is None:
            grid_process.kill()
        for pid, (cwd, _) in run.processes().items():
            if cwd == cell:
                os.kill(pid, signal.SIGKILL)
    assert grid_process.returncode == 143, err
    assert "SIGTERM: stopping 1 running cells (they checkpoint); 0 not started" in out
    assert "stopped Hopper__medium-replay__omiga__0" in out
    assert err.rstrip().endswith("run.py: SIGTERM: the grid stopped; its cells kept their checkpoints, and the same "
                                 "command resumes them")
    assert run.plan(cell)[0] == "resume" and cell not in run.running_cells()


def test_slurm_launcher_without_slurm_is_one_message(tmp_path, tiny_hopper_dir, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert run.main(["--launcher", "slurm", "--algos", "omiga", "--datasets", "medium-replay", "--seeds", "0",
                     "--runs-dir", str(tmp_path / "grid"), "--data-dir", str(tiny_hopper_dir),
                     "--", "--no-generate"]) == 2
    assert 'run.py: error: --launcher slurm: Could not detect "srun"' in capsys.readouterr().err


def test_a_failed_run_is_reported_and_exits_non_zero(tmp_path, tiny_hopper_dir, capsys):
    assert run.main(["--algos", "omiga", "--datasets", "medium-replay", "--seeds", "0", "--runs-dir",
                     str(tmp_path / "grid"), "--data-dir", str(tiny_hopper_dir), *TINY_RUN, "--agent-conf", "9x9"]) == 1
    stdout = capsys.readouterr().out
    assert "finished 0, skipped 0 (already finished), failed 1" in stdout
    assert re.search(r"FAILED Hopper__medium-replay__omiga__0: job \d+ FINISHED, log .*_log\.err ends:\n"
                     r"(    .*\n)*.*9x9", stdout)
    assert not list((tmp_path / "grid").rglob("result.json"))


def test_speed_prints_a_table_for_every_algorithm(capsys):
    speed.main(["--envs", "Hopper", "--updates", "2", "--repeats", "1", "--warmup", "1", "--num-seeds", "1", "2"])
    out = capsys.readouterr().out
    assert "| algorithm | mode | K | Hopper 3x1 |" in out and "batch 128" in out
    for algo in run.ALGOS:
        assert re.search(rf"^\| {algo} \| eager \| 1 \| [\d,]+ \|$", out, re.M), out
    # fused seeds: updates/s of each seed, and in brackets the seed-updates/s, twice that
    for algo in ("omiga", "omcda", "comadice", "icq"):
        per_seed, total = re.search(rf"^\| {algo} \| eager \| 2 \| ([\d,]+) \(([\d,]+)\) \|$", out, re.M).groups()
        assert abs(2 * int(per_seed.replace(",", "")) - int(total.replace(",", ""))) <= 2
    assert not re.search(r"^\| (bc|cql_ma) \| eager \| 2 ", out, re.M)  # single-seed scripts run K = 1 only


def test_allocation_table_and_rank_correlation(tmp_path):
    """Two agents, evaluations at 10 and 20: agent 0 binds at 10 (KL within 20 % of its budget, alpha inside its
    range) and sits on the floor at 20; influence ranks agents like w^r V^r at step 10 and against it at step 20."""
    run_dir = tmp_path / "Hopper__medium-replay__omcda__1__0"
    writer = SummaryWriter(str(run_dir))
    logged = {10: dict(alpha=(0.5, 2.0), kl=(0.55, 0.1), budget=(0.6, 0.6), influence=(0.4, 1.5), reward_value=(1.0, 3.0)),
              20: dict(alpha=(0.1, 2.0), kl=(0.2, 0.6), budget=(0.6, 0.6), influence=(2.0, 1.0), reward_value=(1.0, 3.0))}
    for step, fields in logged.items():
        writer.add_scalar("eval/return_mean", 100.0 * step, step)
        for field, values in fields.items():
            for agent, value in enumerate(values):
                writer.add_scalar(f"agents/{field}_{agent}", value, step)
    writer.close()
    (run_dir / "args.json").write_text(json.dumps(dict(d_tot=1.2, allocation="influence", alpha_min=0.1, alpha_max=100.0)))
    scalars = allocation.read_scalars(run_dir)
    rows = [line.split(" | ") for line in allocation.allocation_table(run_dir, scalars, [10, 20]).splitlines()
            if line.startswith("| 1") or line.startswith("| 2")]
    assert [(row[0], row[2], row[6]) for row in rows] == [("| 10", "0", "yes"), ("| 10", "1", "no"),
                                                          ("| 20", "0", "no"), ("| 20", "1", "yes")]
    assert allocation.binding_counts(scalars, dict(alpha_min=0.1, alpha_max=100.0)) == (2, 2, [1, 1], 0)
    assert allocation.binding_counts(scalars, dict(alpha_min=1.0, alpha_max=100.0)) == (2, 1, [0, 1], 0)
    assert allocation.binding_counts(scalars, dict(alpha_min=2.0, alpha_max=100.0)) == (2, 0, [0, 0], 2)
    pooled, per_step, pairs = allocation.figure3_correlation([scalars])
    assert pairs == 4 and per_step == 0.0  # +1 at step 10, -1 at step 20
    assert abs(pooled - allocation.spearman([1.0, 3.0, 1.0, 3.0], [0.4, 1.5, 2.0, 1.0])) < 1e-12
    assert allocation.spearman([1, 2, 3], [10, 20, 30]) == 1.0 and allocation.spearman([1, 2, 3], [3, 2, 1]) == -1.0


def test_status_names_each_cells_state_progress_and_time_left(tmp_path, capsys, monkeypatch):
    """Synthetic cells: one finished, one stopped with a checkpoint at update 3000 (after its evaluation at 2000),
    one whose process runs in it, one not started; the time left uses each cell's measured updates/s, or its
    algorithm's mean where it has none."""
    import torch

    grid_dir = tmp_path / "grid"
    write_result(grid_dir / "Hopper__medium-replay__omiga__1" / "runs", "omiga", 1, [(5000, 600.0), (10000, 650.0)],
                 updates_per_sec=50.0)
    stopped = write_result(grid_dir / "Hopper__medium-replay__omiga__2" / "runs", "omiga", 2, [(2000, 500.0)],
                           finished=False, updates_per_sec=70.0)
    result = json.loads((stopped / "result.json").read_text())
    result["args"]["total_steps"] = 10000
    (stopped / "result.json").write_text(json.dumps(result))
    torch.save({"step": 3000}, stopped / "model.pt")
    running = write_result(grid_dir / "Hopper__medium-replay__omiga__3" / "runs", "omiga", 3, [(4000, 550.0)],
                           finished=False, updates_per_sec=100.0)
    result = json.loads((running / "result.json").read_text())
    result["args"]["total_steps"] = 10000
    (running / "result.json").write_text(json.dumps(result))
    monkeypatch.setattr(run, "running_cells", lambda: {(grid_dir / "Hopper__medium-replay__omiga__3").resolve()})

    assert run.main(["--status", "--algos", "omiga", "--datasets", "medium-replay", "--seeds", "1", "2", "3", "4",
                     "--runs-dir", str(grid_dir), "--", "--total-steps", "10000"]) == 0
    lines = {line.split()[1] if not line.startswith("not started") else line.split()[2]: line
             for line in capsys.readouterr().out.splitlines() if not line.startswith("grid:")}
    assert lines["Hopper__medium-replay__omiga__1"].startswith("finished") and "650.0 ± 1.0" in lines[
        "Hopper__medium-replay__omiga__1"]
    assert re.search(r"^resumable +\S+ +3,000/10,000 +2 min left at 70 updates/s$", lines["Hopper__medium-replay__omiga__2"])
    assert re.search(r"^running +\S+ +4,000/10,000 +1 min left at 100 updates/s$", lines["Hopper__medium-replay__omiga__3"])
    # no speed of its own: the mean of the others' (50, 70, 100) -> 73.3 updates/s for 10,000 updates
    assert re.search(r"^not started +\S+ +0/10,000 +2 min left at 73 updates/s$", lines["Hopper__medium-replay__omiga__4"])
    run.main(["--status", "--algos", "omiga", "--datasets", "medium-replay", "--seeds", "1", "2", "3", "4",
              "--runs-dir", str(grid_dir), "--", "--total-steps", "10000"])
    summary = capsys.readouterr().out.splitlines()[-1]
    left = (7000 / 70 + 6000 / 100 + 10000 / (220 / 3)) / 3600
    assert summary == f"grid: 1 finished, 1 running, 1 resumable, 1 not started of 4; {left:.1f} core-hours left at the measured speeds"
