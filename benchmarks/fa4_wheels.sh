#!/usr/bin/env bash
# flash-attn-4 onto a GPU machine that has no network and takes at most 64 MiB of files per command.
#
# Its CUTLASS DSL dependency (nvidia-cutlass-dsl-libs-cu13, one 193 MB shared library) is a 92 MB wheel, so
# it travels in two halves over two commands on the same (warm) machine:
#
#   here (network):  bash benchmarks/fa4_wheels.sh pack                 # -> .fa4a/ (half 1), .fa4b/ (half 2 + 7 wheels)
#   device call 1:   bash benchmarks/fa4_wheels.sh stash .fa4a          # carry [".fa4a"]: half 1 kept in /tmp
#   device call 2:   eval "$(bash benchmarks/fa4_wheels.sh install .fa4b)"  # carry [".fa4b"]: join, install, export
#
# Call 2 must come while the machine is still warm (the device tool gives an idle machine back after ~30 s).
# ``install`` puts the wheels into /tmp/fa4_site (pip --target, no index, no dependencies: the image has torch,
# einops, cuda-bindings, protobuf) and prints the PYTHONPATH that makes ``import flash_attn.cute`` work (pip
# --target does not run the DSL's .pth file, so its dsl_packages folder is named explicitly). Measured for
# 4.0.0b36 with torch 2.11+cu130 on an H200: see benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
FA4=flash-attn-4==4.0.0b36
DSL=4.8.1
SITE=/tmp/fa4_site
PARTS=/tmp/fa4_parts
BIG=nvidia_cutlass_dsl_libs_cu13-$DSL-cp312-cp312-manylinux_2_28_x86_64.whl

case "${1:-}" in
pack)
    rm -rf .fa4 .fa4a .fa4b && mkdir -p .fa4 .fa4a .fa4b
    plat=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp)
    for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_28_x86_64; do
        plat+=(--platform "$p")
    done
    for w in "$FA4" nvidia-cutlass-dsl==$DSL nvidia-cutlass-dsl-libs-base==$DSL nvidia-cutlass-dsl-libs-core==$DSL \
             nvidia-cutlass-dsl-libs-cu13==$DSL "quack-kernels==0.6.5" "apache-tvm-ffi==0.1.15.post2" \
             "torch-c-dlpack-ext==0.1.5"; do
        python3 -m pip download -q "${plat[@]}" -d .fa4 "$w"
    done
    half=$(( ($(stat -c %s ".fa4/$BIG") + 1) / 2 ))
    split -b "$half" -d -a 1 ".fa4/$BIG" ".fa4/$BIG.part"
    mv ".fa4/$BIG.part0" .fa4a/ && mv ".fa4/$BIG.part1" .fa4b/
    sha256sum ".fa4/$BIG" | cut -d' ' -f1 > .fa4b/"$BIG".sha256
    rm ".fa4/$BIG" && mv .fa4/*.whl .fa4b/ && rmdir .fa4
    du -sh .fa4a .fa4b
    ;;
stash)
    mkdir -p "$PARTS" && cp "${2:?folder}"/* "$PARTS"/ && ls -la "$PARTS" >&2
    ;;
install)
    t0=$(date +%s)
    dir=${2:?folder}
    cat "$PARTS/$BIG.part0" "$dir/$BIG.part1" > "$PARTS/$BIG"
    echo "$(cat "$dir/$BIG.sha256")  $PARTS/$BIG" | sha256sum -c --quiet - >&2
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$PARTS/$BIG" "$dir"/*.whl >&2
    t1=$(date +%s)
    echo "fa4_wheels: joined and installed in $((t1 - t0)) s" >&2
    echo "export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
    ;;
*)
    echo "usage: $0 pack | stash DIR | install DIR" >&2
    exit 2
    ;;
esac
