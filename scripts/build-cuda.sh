#!/usr/bin/env bash
# Build fedmq with the `cuda` feature on a machine that has no GPU and no CUDA toolkit.
#
# Recipe (see shared/CUDA.md): CUDA 13.0 toolkit pieces from pinned PyPI wheels in a venv, a
# CUDA_HOME folder of symlinks to them, unversioned `libX.so` links, and a stub `libcuda.so`
# (soname libcuda.so.1) so the linker is satisfied; the real libcuda comes from the GPU
# machine's driver at run time. The stub is only on the link path: no rpath points at it.
#
# Usage:
#   scripts/build-cuda.sh [--package DIR] [-- EXTRA_CARGO_ARGS...]
#
# Options:
#   --package DIR   after building, copy the binary into DIR (e.g. dist-cuda/, ignored by git)
#                   together with a short RUN-ON-GPU.txt note, for carrying to a GPU machine.
#   -h, --help      show this help.
#
# Environment (all optional):
#   FEDMQ_CUDA_VENV        venv holding the CUDA wheels        (default: <repo>/.venv-cuda)
#   FEDMQ_CUDA_HOME        CUDA_HOME folder of symlinks        (default: <repo>/cuda-home)
#   FEDMQ_CUDA_TARGET_DIR  cargo target dir                    (default: <repo>/target/cuda)
#   CUDA_COMPUTE_CAP       GPU compute capability to build for (default: 90, i.e. H100/H200)
#   PYTHON                 python used to create the venv      (default: python3)
#   FEDMQ_NICE             niceness of pip and cargo           (default: 19)
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd)"

VENV="${FEDMQ_CUDA_VENV:-$REPO_ROOT/.venv-cuda}"
CUDA_HOME_DIR="${FEDMQ_CUDA_HOME:-$REPO_ROOT/cuda-home}"
TARGET_DIR="${FEDMQ_CUDA_TARGET_DIR:-$REPO_ROOT/target/cuda}"
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
PYTHON="${PYTHON:-python3}"
NICE=(nice -n "${FEDMQ_NICE:-19}")

# Every wheel pinned to CUDA 13.0: an unpinned nvidia-cuda-crt / nvidia-nvvm of a newer CUDA makes
# PTX that driver 580 (CUDA 13.0) may reject.
PINNED_WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cublas==13.0.2.14
  nvidia-cuda-cccl==13.0.85
)
# Libraries cudarc links with -lX (dynamic-linking); libcuda is stubbed separately.
LINK_LIBS=(cublas cublasLt cudart curand nvrtc)

PACKAGE_DIR=""
EXTRA_CARGO_ARGS=()

say() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'build-cuda.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --package)
      [[ $# -ge 2 ]] || die "--package needs a directory"
      PACKAGE_DIR="$2"; shift 2 ;;
    --package=*) PACKAGE_DIR="${1#--package=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_CARGO_ARGS=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

for tool in "$PYTHON" gcc cargo readelf; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH"
done

START_TS=$(date +%s)

# --------------------------------------------------------------------------------------------
say "1/4 CUDA 13.0 wheels in venv $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
  info "creating venv"
  "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# Prints the pins that are not installed at exactly the pinned version (nothing if all are).
missing_pins() {
  "$VPY" - "${PINNED_WHEELS[@]}" <<'EOF'
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != want:
        print(f"{pin} (installed: {have})")
EOF
}

MISSING="$(missing_pins)"
if [[ -z "$MISSING" ]]; then
  info "all ${#PINNED_WHEELS[@]} pinned wheels already installed"
else
  info "to install:"; sed 's/^/      /' <<<"$MISSING"
  info "pip install (~1.2 GB download, a few minutes)"
  "${NICE[@]}" "$VPY" -m pip install --disable-pip-version-check -q "${PINNED_WHEELS[@]}"
  MISSING="$(missing_pins)"
  [[ -z "$MISSING" ]] || die "wheels not at the pinned versions after pip install: $MISSING"
fi

SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU="$SITE/nvidia/cu13"
for d in bin include lib nvvm; do
  [[ -d "$CU/$d" ]] || die "expected wheel folder $CU/$d is missing"
done
[[ -x "$CU/bin/nvcc" ]] || die "nvcc not found in $CU/bin"
[[ -f "$CU/include/cuda.h" ]] || die "cuda.h not found in $CU/include"

# --------------------------------------------------------------------------------------------
say "2/4 CUDA_HOME folder $CUDA_HOME_DIR"
mkdir -p "$CUDA_HOME_DIR/lib64/stubs"
for d in bin include nvvm; do
  ln -sfn "$CU/$d" "$CUDA_HOME_DIR/$d"
done
info "bin, include, nvvm -> $CU"

for lib in "${LINK_LIBS[@]}"; do
  # The wheel ships only versioned names (libX.so.N[.M...]); take the shortest, libX.so.N.
  versioned="$(cd "$CU/lib" && ls -1 "lib$lib.so."* 2>/dev/null | awk '{ print length, $0 }' | sort -n | head -n1 | cut -d' ' -f2-)"
  [[ -n "$versioned" ]] || die "lib$lib.so.* not found in $CU/lib"
  ln -sfn "$CU/lib/$versioned" "$CUDA_HOME_DIR/lib64/$versioned"
  ln -sfn "$versioned" "$CUDA_HOME_DIR/lib64/lib$lib.so"
  info "lib64/lib$lib.so -> $versioned"
done

STUB="$CUDA_HOME_DIR/lib64/stubs/libcuda.so"
CUDA_H="$CU/include/cuda.h"
if [[ -f "$STUB" && "$STUB" -nt "$CUDA_H" && "$STUB" -nt "${BASH_SOURCE[0]}" ]]; then
  info "stub lib64/stubs/libcuda.so up to date"
else
  info "building stub lib64/stubs/libcuda.so (soname libcuda.so.1) from cu* names in cuda.h"
  STUB_C="$CUDA_HOME_DIR/lib64/stubs/libcuda-stub.c"
  # Names as written in cuda.h plus the names after its macros (cuFoo -> cuFoo_v2 ...).
  {
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' "$CUDA_H" || true
    gcc -E -P -I"$CU/include" "$CUDA_H" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' || true
  } | sed -E 's/[[:space:]]*\($//' | sort -u > "$STUB_C.names"
  n_names=$(wc -l < "$STUB_C.names")
  [[ "$n_names" -gt 100 ]] || die "only $n_names cu* names found in $CUDA_H; refusing to build the stub"
  {
    echo "/* Link-time stand-in for the driver's libcuda.so.1; generated by scripts/build-cuda.sh. */"
    echo "/* Never loaded at run time: the GPU machine's driver provides the real library. */"
    sed -E 's/.*/int &(void) { return 999; }/' "$STUB_C.names"
  } > "$STUB_C"
  gcc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$STUB.tmp" "$STUB_C"
  mv -f "$STUB.tmp" "$STUB"
  rm -f "$STUB_C.names"
  info "stub exports $n_names symbols"
fi

# --------------------------------------------------------------------------------------------
say "3/4 cargo build --release --features cuda (CUDA_COMPUTE_CAP=$COMPUTE_CAP, target dir $TARGET_DIR)"
info "first build compiles candle-kernels with nvcc: ~6 min on 2 cores, ~10-20 min in all"
export CUDA_HOME="$CUDA_HOME_DIR"
export CUDA_PATH="$CUDA_HOME_DIR"
export PATH="$CUDA_HOME_DIR/bin:$PATH"
export CUDA_COMPUTE_CAP="$COMPUTE_CAP"
# cudarc's build script adds $CUDA_HOME/lib64 and lib64/stubs with -L already; LIBRARY_PATH makes
# sure of it for any other link step. -L / LIBRARY_PATH add no rpath to the binary.
export LIBRARY_PATH="$CUDA_HOME_DIR/lib64:$CUDA_HOME_DIR/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
info "nvcc: $(nvcc --version | tail -n1)"

cd "$REPO_ROOT"
BUILD_START=$(date +%s)
"${NICE[@]}" cargo build --release --features cuda --target-dir "$TARGET_DIR" "${EXTRA_CARGO_ARGS[@]}"
BUILD_END=$(date +%s)

# --------------------------------------------------------------------------------------------
say "4/4 result"
BIN="$TARGET_DIR/release/fedmq"
[[ -x "$BIN" ]] || die "binary $BIN not found after the build"
info "binary:     $BIN"
info "size:       $(du -h "$BIN" | cut -f1) ($(stat -c %s "$BIN") bytes)"
info "build time: $((BUILD_END - BUILD_START)) s (script total $((BUILD_END - START_TS)) s)"

DYN="$(readelf -d "$BIN")"
info "needed at run time (readelf -d NEEDED):"
grep 'NEEDED' <<<"$DYN" | sed -E 's/.*\[(.*)\]/      \1/'
RPATHS="$(grep -E 'R(UN)?PATH' <<<"$DYN" || true)"
if [[ -n "$RPATHS" ]]; then
  info "rpath/runpath: $RPATHS"
  if grep -q 'stubs' <<<"$RPATHS"; then die "the binary embeds an rpath to the libcuda stub"; fi
else
  info "rpath/runpath: none (the libcuda stub is not referenced at run time)"
fi
info "CUDA libraries as ldd resolves them here with CUDA_HOME/lib64 (libcuda.so.1 'not found' is"
info "expected: the driver provides it on the GPU machine):"
LD_LIBRARY_PATH="$CUDA_HOME_DIR/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$BIN" \
  | grep -E 'cuda|cublas|curand|nvrtc|cudart|not found' | sed 's/^[[:space:]]*/      /' || true

RUN_NOTE="On the GPU machine (driver with CUDA >= 13.0, compute capability $COMPUTE_CAP):
the binary needs libcuda.so.1 from the driver, and the CUDA 13 libraries
libcublas.so.13, libcublasLt.so.13, libcudart.so.13, libcurand.so.10 and libnvrtc.so.13
(they are not shipped). Point LD_LIBRARY_PATH at a folder holding them: the machine's own
CUDA 13 install (e.g. \$CUDA_HOME/lib64) or a Python's site-packages/nvidia/cu13/lib:
  export LD_LIBRARY_PATH=\"\$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], \"cu13\", \"lib\"))'):\${LD_LIBRARY_PATH:-}\"
  ./fedmq --help"

if [[ -n "$PACKAGE_DIR" ]]; then
  say "packaging into $PACKAGE_DIR"
  mkdir -p "$PACKAGE_DIR"
  cp -f "$BIN" "$PACKAGE_DIR/fedmq"
  printf '%s\n' "$RUN_NOTE" > "$PACKAGE_DIR/RUN-ON-GPU.txt"
  info "copied $PACKAGE_DIR/fedmq and $PACKAGE_DIR/RUN-ON-GPU.txt"
  if command -v git >/dev/null 2>&1 && git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    abs_pkg="$(cd "$PACKAGE_DIR" && pwd)"
    case "$abs_pkg/" in
      "$REPO_ROOT"/*)
        if ! git -C "$REPO_ROOT" check-ignore -q "$abs_pkg/fedmq"; then
          info "warning: $PACKAGE_DIR is inside the repository but not ignored by git (use dist-cuda/)"
        fi ;;
    esac
  fi
fi

printf '\n%s\n' "$RUN_NOTE"
