#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, tokenizers, safetensors, huggingface-hub, numpy,
# pillow, but no diffusers, pydantic or torchao and older transformers/peft), for `bench/gpu_suite.py`
# and `bench/speed_bench.py --shapes full` there (about 30 MB).
# Run here, from the repository root; `.whl/` is git-ignored. Then, on the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --out $OUT/suite.json
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 torchao==0.18.0 \
    pydantic==2.14.4 "$(python3 - <<'PY'
import importlib.metadata as m
# pydantic pins its core exactly; take the same pin as the local install.
print(next(r.split(";")[0].replace(" ", "").replace("(", "").replace(")", "")
           for r in m.requires("pydantic") if r.startswith("pydantic-core")))
PY
)" pydantic-settings==2.16.3 annotated-types typing-inspection python-dotenv importlib-metadata
du -sh .whl
