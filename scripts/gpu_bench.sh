#!/usr/bin/env bash
# The GPU checks and figures on a CUDA machine, in one go, each part under its own time limit:
#   the tests (GPU tests included), the default pipeline on the GPU (train -> quantize), time to accuracy
#   (tutorial loop vs engine, the default recipe over 3 seeds, GPU variants), airnet on CIFAR-shaped data,
#   onnxruntime's CUDA provider against the CPU, and the host CPU's fp32 vs bf16 on 2 cores beside them.
# Usage: scripts/gpu_bench.sh OUT_DIR [FASHION_MNIST_DIR] [SECONDS]   (ONLY="tests recipe ...": those parts)
# Runs on the GPU machine's own Python (torch, onnxruntime, pytest); the project from src/ (no install).
# Everything lands in OUT_DIR/results.tar.gz (bench JSON, logs, metrics) and OUT_DIR/log.txt.
set -u
mkdir -p "${1:?usage: scripts/gpu_bench.sh OUT_DIR [FASHION_MNIST_DIR] [SECONDS]}"
OUT=$(realpath "$1")
DATA=$(realpath "${2:-/usr/share/datasets/fashion-mnist}")
BUDGET=${3:-540}
PY=${PY:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
cd "$(dirname "$0")/.."
START=$SECONDS
R=$(mktemp -d /tmp/cnnpipe-gpu-XXXX)
mkdir -p "$R/bin"
printf '#!/bin/sh\nexec %q -c "import sys; from cnnpipe.cli import main; sys.exit(main())" "$@"\n' "$PY" >"$R/bin/cnnpipe"
chmod +x "$R/bin/cnnpipe"
export PATH="$R/bin:$PATH" PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CNNPIPE_JOBS_DIR="$R/jobs" CNNPIPE_CACHE_DIR="$R/cache"
N=$(nproc)  # the last 2 CPUs time the host's fp32 against bf16; the tests and GPU parts use the others
MAIN_CPUS=0-$((N - 3)) HOST_CPUS=$((N - 2)),$((N - 1))
[ "$N" -ge 4 ] || { echo "scripts/gpu_bench.sh: needs 4 or more CPUs, found $N" >&2; exit 1; }
exec > >(tee "$OUT/log.txt") 2>&1

left() { echo $((BUDGET - (SECONDS - START))); }
part() {  # part NAME SECONDS CMD...: run when that much time is left, under that limit, log to $R/NAME.log
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ "$(left)" -lt "$limit" ]; then echo "== $name: skipped, $(left) s left"; return; fi
  echo "== $name (limit $limit s, $(left) s left)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$R/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"; tail -n 25 "$R/$name.log"
  [ "$rc" -eq 0 ] || echo "$name" >>"$R/failed.txt"  # a file: parts run in background subshells too
  return 0
}
pack() { tar -czf "$OUT/results.tar.gz" -C "$R" --exclude=bin --exclude=jobs --exclude=work . 2>/dev/null; }
trap pack EXIT

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$R/gpu.txt"
lscpu | tee "$R/lscpu.txt" | grep -E "Model name|^CPU\(s\)"
grep -owE "amx_[a-z0-9]+|avx512_bf16|avx512f|avx2" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
"$PY" - <<'EOF' | tee "$R/versions.json"
import json, torch, onnxruntime as ort
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "gpu": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported(),
                  "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers()}))
EOF

# Data: the real Fashion-MNIST through the download and split stages, in a scratch folder
W="$R/work"; mkdir -p "$W"; cp params.yaml "$W"/
"$PY" - "$W/params.yaml" "$DATA" <<'EOF'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1])); p["download"]["sources"] = [sys.argv[2]]
yaml.safe_dump(p, open(sys.argv[1], "w"), sort_keys=False)
EOF
(cd "$W" && cnnpipe download && cnnpipe split) >"$R/data.log" 2>&1 || { echo "data failed"; tail "$R/data.log"; exit 1; }
echo "data ready at $(($SECONDS - START)) s"

# The tests, beside the host CPU's precision comparison pinned to the last 2 CPUs (a 2-vCPU machine's share)
part tests 260 taskset -c "$MAIN_CPUS" "$PY" -m pytest tests/unit tests/func/test_cli.py tests/func/test_distributed.py \
  -n 8 --timeout 90 -p no:cacheprovider -v --tb=line -rs --continue-on-collection-errors --junitxml="$R/tests.xml" &
TESTS=$!
(cd "$W" && CNNPIPE_JOBS_DIR="$R/jobs-cpu" part cpu_precision 230 taskset -c "$HOST_CPUS" cnnpipe bench train --device cpu \
  --set device=cpu --steps 0 --train-size 10000 --set epochs=2 --seeds 2 --precisions auto,fp32,bf16 \
  --out "$R/cpu_precision.json") >"$R/cpu_part.txt" 2>&1 &
CPU=$!
wait $TESTS
cd "$W"
part pipeline 150 taskset -c "$MAIN_CPUS" sh -c 'cnnpipe train && cnnpipe evaluate && cnnpipe export && cnnpipe quantize'
"$PY" - "$R/gpu_pipeline.json" <<'EOF'  # every stage's metrics and provenance, as bench/gpu_pipeline.json holds them
import json, sys
from pathlib import Path
stages = {f"{n}{s}": json.loads(Path(f"metrics/{n}{s}.json").read_text())
          for n in ("train", "eval", "export", "quantize") for s in ("", ".info") if Path(f"metrics/{n}{s}.json").exists()}
json.dump({"command": "cnnpipe download && cnnpipe split && cnnpipe train && cnnpipe evaluate && cnnpipe export && "
           "cnnpipe quantize (params.yaml defaults; device auto = the GPU)", "stages": stages},
          open(sys.argv[1], "w"), indent=2)
EOF
part ort_cuda 40 "$PY" - <<'EOF'
import json, statistics, time, numpy as np, onnxruntime as ort
res = {}
for ep in ("CUDAExecutionProvider", "CPUExecutionProvider"):
    if ep not in ort.get_available_providers():
        res[ep] = "not available"; continue
    s = ort.InferenceSession("models/model.onnx", providers=[ep]); name = s.get_inputs()[0].name
    for b in (1, 64):
        x = np.random.default_rng(0).standard_normal((b, 1, 28, 28), dtype=np.float32)
        for _ in range(20): s.run(None, {name: x})
        t = []
        for _ in range(200):
            t0 = time.perf_counter(); s.run(None, {name: x}); t.append(time.perf_counter() - t0)
        res[f"{ep} batch {b}"] = {"p50_ms": round(1e3 * statistics.median(t), 3),
                                  "p99_ms": round(1e3 * sorted(t)[197], 3), "providers": s.get_providers()}
print(json.dumps(res, indent=1))
EOF
part recipe 200 taskset -c "$MAIN_CPUS" cnnpipe bench train --device cuda --seeds 3 --out "$R/gpu_recipe.json"
part airnet_synthetic 100 taskset -c "$MAIN_CPUS" cnnpipe bench train --synthetic-cifar --set model=airnet --set batch_size=1024 \
  --set epochs=4 --synthetic-images 50000 --out "$R/gpu_airnet_cifar_shape.json"
part fp32 60 taskset -c "$MAIN_CPUS" cnnpipe bench train --steps 0 --precisions fp32 --out "$R/gpu_fp32.json"
part airnet_fmnist 120 taskset -c "$MAIN_CPUS" cnnpipe bench train --steps 0 --set model=airnet --set epochs=8 --set batch_size=256 \
  --seeds 3 --out "$R/gpu_airnet_fmnist.json"
part compile 120 taskset -c "$MAIN_CPUS" cnnpipe bench train --steps 0 --set compile=true --out "$R/gpu_compile.json"
part airnet_compiled 150 taskset -c "$MAIN_CPUS" cnnpipe bench train --synthetic-cifar --set model=airnet --set batch_size=1024 \
  --set epochs=4 --set compile=true --synthetic-images 50000 --out "$R/gpu_airnet_cifar_shape_compiled.json"
wait $CPU; cat "$R/cpu_part.txt"
echo "done at $((SECONDS - START)) s; failed parts: $(tr '\n' ' ' <"$R/failed.txt" 2>/dev/null)"
[ ! -s "$R/failed.txt" ]  # exit 1 when a part failed
