#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for `bench/gpu_suite.py` there: it has Python 3.12, its own
# torch, transformers 5.17, tokenizers, safetensors, huggingface-hub, numpy, accelerate, peft and pillow,
# but no diffusers, pydantic or torchao, and no network.
#
#   bench/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12 (the lent machine's); 3.11 to check them here
#
# Run here, from anywhere in the repository. Writes manylinux x86_64 wheels for that Python into `.whl/`
# (git-ignored; GPU_WHEELS_DIR moves it): the main set, which every step installs, and `.whl/fp8/`
# (torchao, built for our torch pin), which only the fp8 step sees: peft imports torchao whenever it
# is importable, and a torchao that fails to import on the machine's torch would break LoRA injection.
# On the machine, in the repository root (README "Benchmarks"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-fp8 .whl/fp8/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."

python_version="${1:-3.12}"
if [[ ! "$python_version" =~ ^3\.[0-9]+$ ]]; then
    echo "usage: bench/gpu_wheels.sh [PYTHON_VERSION]   (e.g. 3.12, the default, or 3.11)" >&2
    exit 2
fi
dest="${GPU_WHEELS_DIR:-.whl}"
mkdir -p "$dest/fp8"
rm -f "$dest"/*.whl "$dest"/fp8/*.whl

download() {  # download DIR REQUIREMENT...: wheels only, no dependencies, for the machine's Python
    local into="$1"
    shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$into" "$@"
}

# What `models`, `api_schemas` and the benches import that the machine lacks or has too old:
# requests and its own imports (diffusers checks its version at import), tqdm (models/__main__),
# typing-extensions >= 4.16 (pydantic 2.14), importlib-metadata and zipp (diffusers names them).
download "$dest" \
    diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 \
    pydantic==2.14.4 pydantic-settings==2.16.3 "typing-extensions>=4.16" annotated-types typing-inspection \
    python-dotenv importlib-metadata zipp tqdm requests urllib3 idna charset-normalizer certifi

# pydantic pins its core exactly: take the pin from the pydantic wheel just downloaded, never from
# whatever pydantic the python3 running this script has.
pydantic_wheel=$(ls "$dest"/pydantic-2.14.4-*.whl)
core=$(python3 - "$pydantic_wheel" <<'PY'
import re
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(name).decode().splitlines():
        found = re.match(r"Requires-Dist:\s*pydantic[-_]core\s*\(?\s*==\s*([^\s;)]+)", line, re.IGNORECASE)
        if found:
            print(f"pydantic-core=={found.group(1)}")
            break
    else:
        sys.exit(f"{sys.argv[1]}: no exact pydantic-core requirement in {name}")
PY
)
echo "pydantic 2.14.4 pins $core"
download "$dest" "$core"

download "$dest/fp8" torchao==0.18.0

ls "$dest" "$dest/fp8"
echo "main set $(du -sh --exclude=fp8 "$dest" | cut -f1), fp8 set $(du -sh "$dest/fp8" | cut -f1)," \
    "total $(du -sh "$dest" | cut -f1) in $dest (Python $python_version)"
