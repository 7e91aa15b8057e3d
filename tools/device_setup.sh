#!/usr/bin/env bash
# On a lent GPU machine (no package index): install the wheels carried in the given folders into /tmp/site and
# unpack a carried `cu13.tar.xz` (the CuTe compiler library of nvidia-cutlass-dsl-libs-cu13, too large for one
# call as a wheel) over it. Idempotent: a warm machine keeps /tmp/site between calls. Prints the PYTHONPATH to use.
#   source tools/device_setup.sh .gpu1 [.gpu2 ...]
# The folders are git-ignored (.git/info/exclude): a device call must name them in its `carry`, or they do not
# travel and the CLI fails on `import hydra`.
SITE=${SITE:-/tmp/site}
mkdir -p "$SITE"
for dir in "$@"; do
  # each folder into its own staging target, then merged: pip's --target --upgrade would replace a shared
  # package folder (nvidia_cutlass_dsl/ holds files of three wheels and of the tarball)
  stage=/tmp/stage_$(basename "$dir")
  ls "$dir"/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$stage" "$dir"/*.whl 2>&1 | grep -v -i "warning\|already exists" | head -5
  [ -d "$stage" ] && cp -r "$stage"/. "$SITE"/
  [ -f "$dir/cu13.tar.xz" ] && tar xJf "$dir/cu13.tar.xz" -C "$SITE"
done
export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD"
python3 -c "import importlib.util as u; print('site:', {m: bool(u.find_spec(m)) for m in ('hydra', 'av', 'diffusers', 'accelerate', 'flash_attn')})"
