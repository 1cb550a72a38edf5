#!/usr/bin/env bash
# Runs the study of docs/results.md: the paper's findings at small scale, on the State of
# the Union addresses.
#
#   scripts/reproduce-results.sh [--quick] [--out DIR]
#
#   1. perplexity by block size: AR (L' = 1), BD3-LM L' = 4, 8, 16 and the MDLM limit
#      (L' = n = 128), one shape, one token budget, seed 0 for all;
#   2. clipped schedules: L' = 4 again with the noise interval kept at [1e-3, 1], and the
#      variance of the training objective of both L' = 4 runs;
#   3. quality against speed: samples of the best block model with first-hitting, DDPM
#      at several step counts and the confidence sampler over a range of thresholds,
#      judged by SmolLM2-135M;
#   4. pictures (SVG) and markdown tables of all three, and the training curves.
#
# Everything lands in DIR (default results/, which git ignores): runs/ (each a `bd3lm
# train` run directory), eval/ and samplers/ (`bd3lm eval` reports, JSON), *.svg and
# tables.md. Finished work is kept: a run that was stopped resumes, a finished run and an
# existing report are not redone (delete them to redo them). --quick trains a smaller
# network for 40 steps and samples less: minutes instead of about two hours on 2 cores,
# for checking the pipeline, not for its figures.
#
# Environment: BD3LM (the binary; default target/release/bd3lm, built when missing),
# BD3LM_THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
out=results
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    *) echo "usage: scripts/reproduce-results.sh [--quick] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done

bd3lm=${BD3LM:-target/release/bd3lm}
if [ ! -x "$bd3lm" ]; then
  cargo build --release -p bd3lm
fi
threads=${BD3LM_THREADS:-2}
run_bd3lm() { "$bd3lm" --threads "$threads" "$@"; }

scripts/fetch-data.sh data >/dev/null
judge=data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
n=128
shards=data/study-shards-$n
if [ ! -f "$shards/index.json" ]; then
  # The demo model's tokenizer (8192-id BPE trained on the same addresses).
  run_bd3lm prepare-data data/sotu --tokenizer services/bd3lm/demo-model/tokenizer.json \
    --out "$shards" --model-length $n
fi

if [ $quick = 1 ]; then
  shape=(--hidden-dim 64 --n-heads 2 --n-blocks 2 --cond-dim 64)
  steps=40 every=20 warmup=10 samples=4 length=64 variance_batches=8
else
  shape=(--hidden-dim 128 --n-heads 4 --n-blocks 4 --cond-dim 128)
  steps=500 every=100 warmup=50 samples=16 length=$n variance_batches=64
fi
mkdir -p "$out/runs" "$out/eval" "$out/samplers"

# train NAME FLAGS...: trains (or resumes) run NAME to $steps steps.
train() {
  local name=$1 run=$out/runs/$1
  shift
  echo "== train $name"
  if [ -d "$run/resume" ]; then
    run_bd3lm train --out "$run" --resume --steps "$steps"
  else
    run_bd3lm train --data "$shards" --out "$run" "${shape[@]}" --batch-size 16 \
      --steps "$steps" --lr 1e-3 --warmup "$warmup" --decay cosine --val-every "$every" \
      --val-batches 8 --save-every "$every" --seed 0 "$@"
  fi
}

train ar --block-size 1
train bs4 --block-size 4
train bs8 --block-size 8
train bs16 --block-size 16
train mdlm --block-size $n
train bs4-full --block-size 4 --no-clip-search

# evaluate REPORT FLAGS...: writes a `bd3lm eval` report unless it exists.
evaluate() {
  local report=$1
  shift
  if [ ! -s "$report" ]; then
    echo "== eval $report"
    run_bd3lm eval "$@" >"$report.tmp"
    mv "$report.tmp" "$report"
  fi
}

for name in ar bs4 bs8 bs16 mdlm bs4-full; do
  evaluate "$out/eval/$name.json" --checkpoint "$out/runs/$name/checkpoint" --data "$shards" \
    --batch-size 16 --variance-batches "$variance_batches"
done

# The block model with the lowest bound is the one whose samplers are compared.
best=$(python3 - "$out"/eval/bs4.json "$out"/eval/bs8.json "$out"/eval/bs16.json <<'EOF'
import json, os, sys
reports = {os.path.basename(p)[:-5]: json.load(open(p))["bound"]["ppl"] for p in sys.argv[1:]}
print(min(reports, key=reports.get))
EOF
)
block=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"]["block_size"])' \
  "$out/eval/$best.json")
echo "== samplers of $best (L' = $block)"
checkpoint=$out/runs/$best/checkpoint
sample=(--checkpoint "$checkpoint" --judge "$judge" --samples "$samples" --sample-length "$length")
# The first also judges held-out text, for scale (one batch of the bound with it).
evaluate "$out/samplers/first-hitting.json" "${sample[@]}" --sampler first-hitting \
  --data "$shards" --batches 1
for steps_per_block in 1 2 $block $((2 * block)) $((4 * block)); do
  evaluate "$out/samplers/ddpm-$steps_per_block.json" "${sample[@]}" --sampler ddpm \
    --steps "$steps_per_block"
done
for threshold in 0.05 0.1 0.2 0.3 0.5 0.9; do
  evaluate "$out/samplers/confidence-$threshold.json" "${sample[@]}" --sampler confidence \
    --threshold "$threshold"
done

echo "== pictures"
{
  echo "# Results ($([ $quick = 1 ] && echo quick || echo full) study, $(date -u +%F))"
  echo
  echo "## Perplexity by block size"
  echo
  run_bd3lm plot block-sizes "$out"/eval/{ar,bs4,bs8,bs16,mdlm}.json --out "$out/block-sizes.svg"
  echo
  echo "## Clipped schedules"
  echo
  run_bd3lm plot variance "$out"/eval/{bs4-full,bs4}.json --out "$out/variance.svg"
  echo
  echo "## Quality against forward passes ($best)"
  echo
  run_bd3lm plot samplers "$out"/samplers/*.json --out "$out/samplers.svg"
} >"$out/tables.md"
run_bd3lm plot curve "$out"/runs/{ar,bs4,bs8,bs16,mdlm,bs4-full} --out "$out/curves.svg"
echo "$out: tables.md, block-sizes.svg, variance.svg, samplers.svg, curves.svg"
