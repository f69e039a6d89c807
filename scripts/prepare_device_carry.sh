#!/usr/bin/env bash
# A fresh checkout's carry for the device tool (both git-excluded): .whl, the wheels and
# Debian packages the device image lacks (jax-triton 0.3.1 for the fused kernels; brotli
# for Python 3.12 and python-minifier, and lrzip with liblzo2, for the 1.0611 record's
# artifact; zpaq has no such wheel on PyPI), and .shared, a copy of ../shared's data and
# reference code, and of the fixtures the fidelity scripts read (the seed-314 weights, the
# reference's curves; 64 MiB may travel in all). Then:
#   run(command="OUT=$OUT ... bash scripts/device_....sh", carry=[".shared", ".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .shared
python3 -m pip download -q --no-deps -d .whl jax-triton==0.3.1 python-minifier==3.4.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl brotli==1.2.0
(cd .whl && apt-get download lrzip liblzo2-2 >/dev/null 2>&1) || { apt-get update -qq && (cd .whl && apt-get download lrzip liblzo2-2); }
rm -rf .shared/data .shared/reference .shared/fixtures && cp -a ../shared/data ../shared/reference .shared/
mkdir -p .shared/fixtures/reference
cp -a ../shared/fixtures/reference/record_init_seed314_bf16bits.npz ../shared/fixtures/reference/curves .shared/fixtures/reference/
for d in .whl .shared; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
du -sh .whl .shared
