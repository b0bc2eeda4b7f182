#!/usr/bin/env bash
# Builds benchmarks/kernel_ab/harness.cpp against several variants of the avx512vbmi kernel unit.
#
#   bash benchmarks/kernel_ab/build.sh OUTDIR NAME:SRCTREE[:CXXFLAGS] [NAME:SRCTREE[:CXXFLAGS] ...]
#
# Each variant compiles SRCTREE/csrc/cpu/kernels_avx512vbmi.cpp (a checkout, e.g. `git worktree add`, or this
# tree with extra -D flags) into namespace ns_NAME. The first variant is the baseline of the ratios. Writes
# OUTDIR/harness and OUTDIR/maps/{signed,unsigned}.bin (from `import kbit`). Then run, for example:
#   OUTDIR/harness adam 65536 300 1 OUTDIR/maps
# Needs g++ with AVX-512 VBMI support; runs only on a CPU that has it.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n 2,9p "$0"
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
out=$1
shift
mkdir -p "$out/obj" "$out/maps"
python -c "
import kbit.functional as F
F.create_dynamic_map(signed=True).numpy().tofile('$out/maps/signed.bin')
F.create_dynamic_map(signed=False).numpy().tofile('$out/maps/unsigned.bin')"
# The project's flags (CMakeLists.txt) and the unit's ISA flags.
common="-O3 -std=c++17 -fopenmp -ffp-contract=off -fno-fast-math -fno-math-errno -DNDEBUG"
isa="-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vbmi"
objs=()
list=""
first=""
for spec in "$@"; do
  IFS=: read -r name src flags <<< "$spec"
  if [ -z "$name" ] || [ ! -f "$src/csrc/cpu/kernels_avx512vbmi.cpp" ]; then
    echo "bad variant '$spec': expected NAME:SRCTREE[:CXXFLAGS] with SRCTREE a kbit checkout" >&2
    exit 2
  fi
  [ -n "$first" ] || first=$src
  # shellcheck disable=SC2086  # flags are deliberately split
  g++ $common $isa $flags -I"$src/csrc" -Davx512vbmi="ns_$name" -DkAvx512VbmiKernels="k_$name" \
    -c "$src/csrc/cpu/kernels_avx512vbmi.cpp" -o "$out/obj/$name.o" &
  objs+=("$out/obj/$name.o")
  list="$list X(k_$name)"
done
g++ $common -I"$first/csrc" -c "$first/csrc/cpu/code_lut.cpp" -o "$out/obj/code_lut.o" &
g++ $common -I"$first/csrc" -c "$first/csrc/cpu/byte_planes.cpp" -o "$out/obj/byte_planes.o" &
wait
g++ $common -I"$first/csrc" "-DKBIT_AB_VARIANTS=$list" -c "$here/harness.cpp" -o "$out/obj/harness.o"
g++ $common "${objs[@]}" "$out/obj/code_lut.o" "$out/obj/byte_planes.o" "$out/obj/harness.o" -o "$out/harness"
echo "built $out/harness with$list"
