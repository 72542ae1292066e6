#!/usr/bin/env bash
# Downloads, on this machine (which reaches the package registries), the wheels that the lent GPU machine's image
# lacks (its Python 3.12 has torch, torch-geometric, lightning, xarray, numpy, scipy and matplotlib; no pydantic,
# zarr, dask or torch-harmonics), into .whl/device (git-ignored; about 14 MB). benchmarks/device_checks.sh
# installs them there with no network. Versions are those of pyproject.toml. shared/bench/gnn_baseline.py is copied
# beside them.
#   bash benchmarks/device_wheels.sh
#   then: the device tool's run with carry [".whl/device"] and command "bash benchmarks/device_checks.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl/device
rm -rf "$dest.partial" && mkdir -p "$dest.partial"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dest.partial" \
    pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 crc32c==2.9.post0 \
    dask==2026.8.0 cloudpickle==3.1.3 partd==1.4.2 locket==1.0.0 toolz==1.2.0
# torch-harmonics 0.8.0 is published as source only; it is pure Python, so its wheel is built here
python3 -m pip wheel -q --no-deps --no-build-isolation torch-harmonics==0.8.0 -w "$dest.partial"
# the plain baseline of the graph-network comparison, beside the wheels so that it travels with them (shared/ is
# outside the repository; it is run as it is, not part of the project)
for candidate in shared/bench/gnn_baseline.py ../shared/bench/gnn_baseline.py; do
    [ -f "$candidate" ] && cp "$candidate" "$dest.partial/" && break
done
rm -rf "$dest" && mv "$dest.partial" "$dest"
ls "$dest"
