"""benchmarks/: report.py's numbers on synthetic runs, run.py's grid, resuming and failures, speed.py's table,
allocation.py's per-agent table and rank correlation."""

import json
import os
import re
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "benchmarks"))
import allocation  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import speed  # noqa: E402

TINY_RUN = ["--", "--total-steps", "20", "--eval-every", "10", "--eval-episodes", "1", "--final-eval-episodes", "1",
            "--log-every", "10", "--no-generate"]


def write_run(root, algo, seed, evals, dataset="medium-replay", total_steps=100, mtime=None, result=None):
    """A run folder as the scripts write it: args.json and eval/return_mean scalars at (step, value)."""
    run_dir = root / f"Hopper__{dataset}__{algo}__{seed}__{mtime or 0}"
    writer = SummaryWriter(str(run_dir))
    for step, value in evals:
        writer.add_scalar("eval/return_mean", value, step)
    writer.close()
    args = dict(env="Hopper", agent_conf=None, dataset=dataset, exp_name=algo, seed=seed, total_steps=total_steps)
    (run_dir / "args.json").write_text(json.dumps(args))
    if result:
        (run_dir / "result.json").write_text(json.dumps(result))
    if mtime:
        os.utime(run_dir / "args.json", (mtime, mtime))
    return run_dir


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


def test_report_averages_last_and_best_evaluation_over_seeds(tmp_path, tiny_hopper_dir):
    runs = tmp_path / "runs"
    # omiga, medium-replay: last evals 100, 200, 300; best evals 150, 200, 400.
    write_run(runs, "omiga", 0, [(50, 150.0), (100, 100.0)], mtime=2_000_000_000)
    write_run(runs, "omiga", 0, [(50, 999.0), (100, 999.0)], mtime=1_000_000_000)  # an older run of seed 0: ignored
    write_run(runs, "omiga", 1, [(50, 50.0), (100, 200.0)])
    write_run(runs, "omiga", 2, [(50, 400.0), (100, 300.0)],
              result=dict(seconds=3600.0, finished_at=1_700_003_600.0, hardware="Test CPU (2 cores)",
                          command="python benchmarks/run.py --algos omiga"))
    write_run(runs, "icq", 0, [(50, 10.0)])  # unfinished: its last evaluation is not at total_steps
    write_run(runs, "icq", 0, [(100, 10.0)], dataset="expert")
    out = tmp_path / "results.md"

    report.main([str(runs), "--out", str(out), "--data-dir", str(tiny_hopper_dir)])

    text = out.read_text()
    last = table(text, "**Last evaluation**")
    best = table(text, "**Best evaluation**")
    assert list(last) == ["expert", "medium-replay"]  # rows in the order of common.datasets.QUALITIES
    assert list(last["medium-replay"])[-2:] == ["omiga", "icq"]  # columns in run.ALGOS order
    assert last["medium-replay"]["omiga"] == "200.0 ± 81.6 (n=3)"
    assert best["medium-replay"]["omiga"] == "250.0 ± 108.0 (n=3)"
    assert last["medium-replay"]["icq"] == "—"
    assert last["expert"]["icq"] == "10.0 (n=1)" and last["expert"]["omiga"] == "—"
    assert last["medium-replay"]["transitions"] == "600"  # the card of the tiny dataset file
    assert last["expert"]["transitions"] == "—"  # no file for it
    assert "## Hopper 3x1" in text
    assert "hardware: Test CPU (2 cores)" in text and "`python benchmarks/run.py --algos omiga`" in text
    assert "1 runs took 1.00 h of run time" in text
    assert re.search(r"Unfinished runs.*\n\n- `.*Hopper__medium-replay__icq__0__0`: last evaluation at step 50 of 100",
                     text)


def test_report_draws_learning_curves_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    write_run(runs, "omiga", 0, [(50, 1.0), (100, 2.0)])
    report.main([str(runs), "--out", str(tmp_path / "results.md"), "--data-dir", str(tmp_path)])
    assert (tmp_path / "curves" / "Hopper-3x1-medium-replay.png").stat().st_size > 0
    assert "](curves/Hopper-3x1-medium-replay.png)" in (tmp_path / "results.md").read_text()


def test_report_without_runs_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no runs under"):
        report.main([str(tmp_path), "--out", str(tmp_path / "results.md")])


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
    assert "invalid choice: 'omgia' (choose from 'omcda', 'omiga', 'icq', 'comadice', 'bc', 'cql_ma', 'cfcql', 'omar')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--dry-run", "--", "--seed", "3"])
    assert "--seed after -- is set by run.py" in capsys.readouterr().err


def test_grid_runs_end_to_end_then_skips_the_finished_run(tmp_path, tiny_hopper_dir, capsys):
    grid = ["--algos", "omiga", "--datasets", "medium-replay", "--seeds", "0", "--workers", "1",
            "--runs-dir", str(tmp_path / "grid"), "--data-dir", str(tiny_hopper_dir)]
    result = run_script("benchmarks/run.py", *grid, *TINY_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "finished 1, skipped 0 (already finished), failed 0" in result.stdout
    run_folder = tmp_path / "grid" / "Hopper__medium-replay__omiga__0"
    (run_dir,) = (run_folder / "runs").iterdir()
    assert run_dir.name.startswith("Hopper__medium-replay__omiga__0__")
    outcome = json.loads((run_dir / "result.json").read_text())
    assert outcome["episodes"] == 1 and outcome["arguments"][-len(TINY_RUN) + 1:] == TINY_RUN[1:]
    assert "final return:" in (run_folder / "log.txt").read_text()

    assert run.main([*grid, "--dry-run", *TINY_RUN]) == 0
    assert re.search(r"^skip +Hopper__medium-replay__omiga__0$", capsys.readouterr().out, re.M)
    assert run.main([*grid, "--dry-run", *TINY_RUN[:2], "30", *TINY_RUN[3:]]) == 0
    assert re.search(r"^rerun \(arguments changed\) +Hopper__medium-replay__omiga__0$", capsys.readouterr().out, re.M)

    report.main([str(tmp_path / "grid"), "--out", str(tmp_path / "results.md"), "--data-dir", str(tiny_hopper_dir)])
    cell = table((tmp_path / "results.md").read_text(), "**Last evaluation**")["medium-replay"]["omiga"]
    assert cell == f"{outcome['return_mean']:.1f} (n=1)"


def test_a_failed_run_is_reported_and_exits_non_zero(tmp_path, tiny_hopper_dir):
    result = run_script("benchmarks/run.py", "--algos", "omiga", "--datasets", "medium-replay", "--seeds", "0",
                        "--runs-dir", str(tmp_path / "grid"), "--data-dir", str(tiny_hopper_dir),
                        *TINY_RUN, "--agent-conf", "9x9", cwd=tmp_path)
    assert result.returncode == 1
    assert "finished 0, skipped 0 (already finished), failed 1" in result.stdout
    assert re.search(r"failed Hopper__medium-replay__omiga__0: exit code 2, log .*log.txt ends:\n(    .*\n)*.*9x9",
                     result.stdout)
    assert not list((tmp_path / "grid").rglob("result.json"))


def test_speed_prints_a_table_for_every_algorithm(capsys):
    speed.main(["--envs", "Hopper", "--updates", "2", "--repeats", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "| algorithm | Hopper 3x1 |" in out and "batch 128" in out
    for algo in run.ALGOS:
        assert re.search(rf"^\| {algo} \| [\d,]+ \|$", out, re.M), out


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
    pooled, per_step, pairs = allocation.figure3_correlation([scalars])
    assert pairs == 4 and per_step == 0.0  # +1 at step 10, -1 at step 20
    assert abs(pooled - allocation.spearman([1.0, 3.0, 1.0, 3.0], [0.4, 1.5, 2.0, 1.0])) < 1e-12
    assert allocation.spearman([1, 2, 3], [10, 20, 30]) == 1.0 and allocation.spearman([1, 2, 3], [3, 2, 1]) == -1.0
