#!/usr/bin/env bash
# What a session with a GPU lease runs, in commands that each end inside the lease's 10 minutes per command:
#
#   bash benchmarks/gpu.sh OUT_DIR data                        # generate the four Hopper datasets (background)
#   bash benchmarks/gpu.sh OUT_DIR speed                       # the speed table and the headline command's speed -> OUT_DIR/speed.md
#   bash benchmarks/gpu.sh OUT_DIR grid ALGO SECONDS [DATASET...]  # train or continue ALGO on Hopper datasets
#   bash benchmarks/gpu.sh OUT_DIR baselines SECONDS            # the slow baselines' 30k-update runs (below)
#
# data: the datasets are not in the repository (1.3 GB) and a lease's machine starts bare; generating all four with
# 16 cores took about 6.5 min (medium-expert, 2e6 transitions, about 11 min), so start it first, in the background.
# grid: one process per dataset (default: all four), each with 5 fused seeds (1..5), --compile, the seeds' 1e6
# updates and an evaluation every 50,000 (at the default 5,000, evaluating took 17 % of an H100 run's wall time;
# every 50,000, about 2 %). Every
# process gets SECONDS and then stops with a checkpoint (SIGTERM), so the next `grid` command continues it with
# --resume (timeout --foreground: the signal goes to the script alone, which then closes its evaluation workers
# itself); checkpoints stay on the machine, so a run must finish within one lease (30 min). On the H100, omiga with
# 5 fused seeds trains 1,477 updates/s alone: 1e6 updates take about 11 min of the GPU, and processes sharing it
# share that rate. Finished and unfinished runs' result.json files go to OUT_DIR/results-ALGO.tar.gz (paths as
# benchmarks/report.py --collect reads them).
# baselines: the runs the baselines need that cost 80+ min each on a CPU core: omar.py on the four datasets and
# bcq_ma.py's four flag settings (BCQ, w/ value deviation, w/ transition normalization, MABCQ) on medium and
# medium-replay, at seed 003's MuJoCo settings (its Table 12: the setting its ablation claims are made in, and the
# one benchmarks/ablations/bcq_ma-seed003-settings ran on the CPU); 12 processes, seed 1, 30,000 updates, evaluation
# every 5,000, eager (these scripts have no --num-seeds, --cuda-graph or --compile); resumable like grid. Their result.json files
# go to OUT_DIR/results-baselines.tar.gz.
set -euo pipefail
out=$(realpath "$1")
task=$2
cd "$(dirname "$0")/.."
datasets=(medium-replay medium expert medium-expert)
mkdir -p "$out" runs/gpu

# train_cell CELL SECONDS ALGO ARGS...: start ALGO in CELL with ARGS, or continue CELL's latest checkpoint; nothing
# if CELL's run has finished. Stops with a checkpoint after SECONDS.
train_cell() {
    local cell=$1 seconds=$2 algo=$3
    shift 3
    mkdir -p "$cell"
    local checkpoint run
    checkpoint=$(ls -t "$cell"/runs/*/model.pt 2>/dev/null | head -1 || true)
    if ls "$cell"/runs/*/result.json >/dev/null 2>&1 && grep -q '"finished": true' "$cell"/runs/*/result.json; then
        return
    elif [ -n "$checkpoint" ]; then
        run=(--resume "$(realpath "$(dirname "$checkpoint")")" --data-dir "$(realpath data)")
    else
        run=("$@" --data-dir "$(realpath data)" --no-generate --save-model)
    fi
    (cd "$cell" && timeout --foreground --signal TERM --kill-after 60 "$seconds" \
        python "$OLDPWD/$algo.py" "${run[@]}" >>"run.log" 2>&1 || true)
}

case "$task" in
data)
    for quality in "${datasets[@]}"; do
        setsid nohup python -m common.collect dataset --env Hopper --quality "$quality" --num-envs 16 \
            >"runs/gpu/data-$quality.log" 2>&1 &
    done
    ;;
speed)
    python benchmarks/speed.py --algos omiga omcda comadice icq --envs Hopper --num-seeds 1 5 20 \
        --modes eager graph compile+graph --repeats 3 --updates 300 | tee "$out/speed.md"
    python benchmarks/speed.py --envs Hopper --repeats 3 --updates 100 | tee -a "$out/speed.md"
    # the headline command with no flags (the update a captured CUDA graph by default): its training time per update
    python omcda.py --env Hopper --dataset medium-replay --d-tot 1.2 --total-steps 20000 --eval-every 1000000 \
        --final-eval-episodes 1 --exp-name headline 2>/dev/null | grep "^time:" | sed 's/^/headline, 20,000 updates: /' \
        | tee -a "$out/speed.md"
    ;;
grid)
    algo=$3
    seconds=$4
    shift 4
    [ $# -gt 0 ] && datasets=("$@")
    for quality in "${datasets[@]}"; do
        train_cell "runs/gpu/$algo/$quality" "$seconds" "$algo" --env Hopper --dataset "$quality" --seed 1 \
            --num-seeds 5 --compile --total-steps 1000000 --eval-every 50000 --exp-name "$algo" &
    done
    wait
    find "runs/gpu/$algo" -name result.json -print0 | tar -czf "$out/results-$algo.tar.gz" --null -T -
    tail -n 3 runs/gpu/"$algo"/*/run.log
    ;;
baselines)
    seconds=$3
    for quality in "${datasets[@]}"; do
        train_cell "runs/gpu/baselines/omar/$quality" "$seconds" omar --env Hopper --dataset "$quality" --seed 1 \
            --total-steps 30000 &
    done
    seed003=(--hidden-dim 64 --vae-hidden-dim 64 --batch-size 1024 --latent-scale 10 --q-lr 1e-3
             --perturbation-lr 1e-4 --vae-lr 1e-4)
    for quality in medium medium-replay; do
        for variant in bcq_ma bcq_ma_vd bcq_ma_tn mabcq; do
            case $variant in
            bcq_ma) flags=() ;;
            bcq_ma_vd) flags=(--value-deviation) ;;
            bcq_ma_tn) flags=(--transition-normalization) ;;
            mabcq) flags=(--value-deviation --transition-normalization) ;;
            esac
            train_cell "runs/gpu/baselines/$variant/$quality" "$seconds" bcq_ma --env Hopper --dataset "$quality" \
                --seed 1 --total-steps 30000 --exp-name "$variant" "${seed003[@]}" "${flags[@]}" &
        done
    done
    wait
    find runs/gpu/baselines -name result.json -print0 | tar -czf "$out/results-baselines.tar.gz" --null -T -
    tail -n 3 runs/gpu/baselines/*/*/run.log
    ;;
*)
    echo "unknown task $task: data, speed, grid or baselines" >&2
    exit 2
    ;;
esac
