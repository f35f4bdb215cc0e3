#!/usr/bin/env bash
# Issue #4's GPU figures in one device call: all-heads ablation (batched vs per-head loop) and the long-context
# retrieval scan, both on a random-weight Llama-3.2-1B-shaped model in bf16. JSON lines and logs go to $OUT.
#   usage (device tool): OUT=$OUT bash benchmarks/gpu_figures.sh
# Needs python3 with CUDA torch, transformers and transformer_lens (with its imports: datasets, pyarrow, einops,
# jaxtyping, beartype, typeguard, accelerate, rich, sentencepiece, pandas, scipy). Wheels for whatever the machine
# lacks can be downloaded here (`pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl PKG`),
# carried as `.whl` and are installed from there with no index.
set -u
: "${OUT:?set OUT to an output directory}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers, transformer_lens; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
  date -u; } > "$OUT/env.txt" 2>&1
python3 - <<'PY' || exit 2
import importlib.util, sys
need = ["torch", "transformers", "transformer_lens", "datasets", "pyarrow", "accelerate", "einops", "fancy_einsum",
        "jaxtyping", "beartype", "typeguard", "rich", "sentencepiece", "pandas", "scipy", "safetensors", "tqdm", "PIL"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("missing on this machine (carry their wheels in .whl/): " + " ".join(missing))
PY
python3 -c "import attnlab, transformer_lens" 2> "$OUT/import_error.txt" || { tail -3 "$OUT/import_error.txt"; exit 2; }

timeout 280 python3 benchmarks/ablation_speed.py --shape llama-1b --device cuda --dtype bfloat16 --length 256 \
  --n-prompts 1 --variants batched,loop --repeats 1 > "$OUT/ablation.json" 2> "$OUT/ablation.log"
echo "ablation rc=$?"; cat "$OUT/ablation.json"
timeout 280 python3 benchmarks/retrieval_long_context.py --shape llama-1b --device cuda --dtype bfloat16 \
  --lengths 4096,16384,32768 --trials 3 > "$OUT/retrieval.json" 2> "$OUT/retrieval.log"
echo "retrieval rc=$?"; cat "$OUT/retrieval.json"
