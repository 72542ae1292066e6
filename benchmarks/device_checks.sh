#!/usr/bin/env bash
# The GPU checks of the graph-forecaster and diffusion issues in one run on a lent GPU machine, each step under
# its own time limit, every figure as JSON lines in $OUT (default benchmarks/out):
#   1. graph_network.jsonl: the project's graph network (benchmarks/bench_graph_network.py) and the plain
#      torch-geometric build of shared/bench/gnn_baseline.py at the 1-degree size (65,160 grid nodes, mesh
#      level 6, hidden 512, 16 layers, bf16), in one run on the same GPU; the 0.25-degree size (1,038,240 grid
#      nodes), which reports whether it fits at all; last, the 1-degree size again under torch.compile;
#   2. diffusion.jsonl: sampling cost per member and lead of each diffusion family on both quickstart grids
#      (benchmarks/bench_diffusion.py);
#   3. summary.txt: the step-time ratio against the baseline and the lines above in short
#      (benchmarks/device_summary.py).
# The image lacks some of the project's imports: the wheels of benchmarks/device_wheels.sh (carried as
# .whl/device) are installed into a temporary directory first. DEVICE=cpu runs the same steps at the tiny
# sizes on a CPU, to check the script itself:
#   DEVICE=cpu OUT=/tmp/out bash benchmarks/device_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
log="$OUT/device_checks.log"
: > "$log"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

if ls .whl/device/*.whl > /dev/null 2>&1; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --target "$site" .whl/device/*.whl >> "$log" 2>&1 \
        && say "installed $(ls .whl/device | wc -l) carried wheels into $site" \
        || say "installing the carried wheels failed (pip's message is in $log)"
    export PYTHONPATH="$PWD:$site"
else
    export PYTHONPATH="$PWD"
    say "no .whl/device: using the image's packages as they are"
fi
baseline=""
for candidate in shared/bench/gnn_baseline.py ../shared/bench/gnn_baseline.py .whl/device/gnn_baseline.py; do
    [ -f "$candidate" ] && baseline=$candidate && break
done

# run LIMIT_S FILE COMMAND...: COMMAND's stdout appended to FILE, its stderr to the log; a failure is logged, and
# summary.txt is rewritten after every step, so a run stopped from outside still leaves what it measured
run() {
    local limit=$1 file=$2; shift 2
    say "start (limit ${limit} s): $*"
    timeout "$limit" "$@" >> "$file" 2>> "$log"
    say "rc $? after: $*"
    python3 benchmarks/device_summary.py "$OUT" > "$OUT/summary.txt" 2>> "$log"
}

if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
else
    echo "no nvidia-smi" > "$OUT/gpu.txt"
fi
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())" \
    >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" | tee -a "$log"

g="$OUT/graph_network.jsonl"
if [ "$DEVICE" = cpu ]; then
    run 300 "$g" python3 benchmarks/bench_graph_network.py --device cpu --size tiny --steps 2
    [ -n "$baseline" ] && run 300 "$g" python3 "$baseline" --grid-deg 10 --mesh-level 2 --hidden 32 --layers 2 \
        --channels 10 --steps 2 --warmup 1 --dtype fp32
    run 600 "$OUT/diffusion.jsonl" python3 benchmarks/bench_diffusion.py --device cpu --repeats 1 --grid global \
        --family dyffusion
else
    # most wanted first: the device tool stops a command at 10 minutes, and these limits add up to more
    [ -n "$baseline" ] && run 150 "$g" python3 "$baseline" --impl plain-pyg
    [ -z "$baseline" ] && say "shared/bench/gnn_baseline.py not found: no baseline line"
    run 150 "$g" python3 benchmarks/bench_graph_network.py --device "$DEVICE" --size 1deg
    run 200 "$g" python3 benchmarks/bench_graph_network.py --device "$DEVICE" --size 0.25deg
    run 120 "$OUT/diffusion.jsonl" python3 benchmarks/bench_diffusion.py --device "$DEVICE"
    run 180 "$g" python3 benchmarks/bench_graph_network.py --device "$DEVICE" --size 1deg --compile
fi
tee -a "$log" < "$OUT/summary.txt"
