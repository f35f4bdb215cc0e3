#!/usr/bin/env bash
# Train all three organisms at once on one GPU: three organism-lm recipe variants, organism-vlm and organism-dit
# in parallel processes, then keep the best LM variant and pack everything into parts of < 15 MB under $OUT.
# This is the run that produced the shipped weights (see each MODEL_CARD.md).
#   usage: OUT=/path/to/out bash scripts/train_organisms_gpu.sh [lm_minutes]
# Needs: python3 with torch (CUDA), transformers, tokenizers, safetensors, scikit-learn; diffusers for the DiT
# (installed from ./.whl if that folder holds its wheel).
set -u
: "${OUT:?set OUT to an output directory}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
LM_MIN=${1:-8}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__)"; date -u; } > "$OUT/env.txt" 2>&1

cap=$(( ${LM_MIN%.*} * 60 + 90 ))
for v in a b c; do
  timeout $cap python3 -m attnlab.models.train lm --preset gpu --variant $v --device cuda --workers 2 --out "$OUT/lm_$v" --max-minutes "$LM_MIN" > "$OUT/lm_$v.log" 2>&1 &
done
timeout $cap python3 -m attnlab.models.train vlm --preset gpu --device cuda --seed 0 --out "$OUT/vlm" --max-minutes 6 > "$OUT/vlm.log" 2>&1 &
timeout $cap python3 -m attnlab.models.train dit --preset gpu --device cuda --seed 0 --out "$OUT/dit" --max-minutes 5.5 > "$OUT/dit.log" 2>&1 &
wait
nvidia-smi --query-gpu=memory.used --format=csv >> "$OUT/env.txt" 2>&1

python3 -m attnlab.models.train lm --select "$OUT"/lm_a "$OUT"/lm_b "$OUT"/lm_c --prune > "$OUT/lm_select.txt" 2>&1
cd "$OUT" || exit 1
tar cf - lm_a lm_b lm_c lm_a.log lm_b.log lm_c.log lm_select.txt | split -b 15M -d - lm.tar.part
tar cf - vlm vlm.log | split -b 15M -d - vlm.tar.part
tar cf - dit dit.log | split -b 15M -d - dit.tar.part
rm -rf lm_a lm_b lm_c vlm dit ./*.log
ls -la
