#!/usr/bin/env bash
# Issue #13's GPU figures in one device call, then issue #4's (benchmarks/gpu_figures.sh): census throughput on
# HeadVis's workload shape (random-token sequences of 512 tokens, bf16) for random-weight Llama-3.2-1B- and
# Llama-3.1-8B-shaped models, the all-heads exact ablation, the projection to 16,384 sequences, and (last) the kept
# weights block against streamed rows on the GPU (benchmarks/census_paths_agree.py).
#   usage (device tool, .whl carried): OUT=$OUT bash benchmarks/census_gpu.sh
set -u
: "${OUT:?set OUT to an output directory}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers, transformer_lens; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
  date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -c "import attnlab.census, transformer_lens" 2> "$OUT/import_error.txt" || { tail -3 "$OUT/import_error.txt"; exit 2; }
T0=$(date +%s)
run() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/census_speed.py "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name rc=$? ($(( $(date +%s) - T0 )) s)"; cat "$OUT/$name.json"; tail -2 "$OUT/$name.log"
}
run census_1b 120 --shape llama-1b --device cuda --dtype bfloat16 --seq-len 512 --n-prompts 512 \
  --batch-size 16 --repeats 1 --statistics sinks,headvis,patterns --ablation-prompts 16
run census_8b 220 --shape llama-8b --device cuda --dtype bfloat16 --seq-len 512 --n-prompts 256 \
  --batch-size 16 --repeats 1 --statistics sinks,headvis,patterns --ablation-prompts 16
# issue #4's figures: all-heads ablation (batched vs per-head loop) and the long-context retrieval scan, 1B shape
timeout 80 python3 benchmarks/ablation_speed.py --shape llama-1b --device cuda --dtype bfloat16 --length 256 \
  --n-prompts 1 --variants batched,loop --repeats 1 > "$OUT/ablation.json" 2> "$OUT/ablation.log"
echo "ablation rc=$? ($(( $(date +%s) - T0 )) s)"; cat "$OUT/ablation.json"; tail -2 "$OUT/ablation.log"
timeout 100 python3 benchmarks/retrieval_long_context.py --shape llama-1b --device cuda --dtype bfloat16 \
  --lengths 4096,16384,32768 --trials 1 > "$OUT/retrieval.json" 2> "$OUT/retrieval.log"
echo "retrieval rc=$? ($(( $(date +%s) - T0 )) s)"; cat "$OUT/retrieval.json"; tail -2 "$OUT/retrieval.log"
# the kept-block path (which also gives each layer's attention output) against streamed rows, on the GPU in bf16
timeout 60 python3 benchmarks/census_paths_agree.py --shape llama-1b --device cuda --dtype bfloat16 --n-prompts 16 \
  > "$OUT/paths_agree.json" 2> "$OUT/paths_agree.log"
echo "paths_agree rc=$? ($(( $(date +%s) - T0 )) s)"; cat "$OUT/paths_agree.json"; tail -2 "$OUT/paths_agree.log"
