#!/usr/bin/env bash
# Installs what moelora needs (Debian/Ubuntu packages; CUDA is optional and used when
# /usr/local/cuda/bin/nvcc exists), configures and builds into ./build.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in cmake ninja-build g++ ccache libgtest-dev nlohmann-json3-dev libcli11-dev libfmt-dev \
  libpcre2-dev libutf8proc-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "bootstrap: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${MOELORA_CMAKE_ARGS:-} >/dev/null
ninja -C "$BUILD_DIR"
