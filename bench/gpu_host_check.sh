#!/usr/bin/env bash
# The lent GPU machine, reproduced here without its GPU: does the GPU suite run there to the end?
#
#   bench/gpu_host_check.sh [PYTHON_VERSION]    # default 3.12 when python3.12 runs here, else 3.11
#
# 1. A throwaway venv with the machine's own packages from PyPI: transformers 5.17.0, tokenizers 0.23.2,
#    huggingface-hub 1.33.0, safetensors 0.8.0, numpy 2.5.2 (or the nearest release below it with a
#    wheel for this Python), accelerate 1.15.0, peft (HOST_PEFT, default 0.17.1: the machine's is not
#    known; ours shadows it), pillow, and torch 2.13.0 from the CPU wheel on this disk (the machine has
#    2.11 with CUDA; a CUDA torch is never downloaded here: the check stops if pip would fetch one).
# 2. bench/gpu_wheels.sh PYTHON_VERSION into the work folder, installed exactly as README
#    "Benchmarks" says (pip --target, no deps, no index; the fp8 set to its own target; PYTHONPATH).
# 3. Which copy of each library is imported (ours from the target, torchao not on the main path), then
#    `bench/gpu_suite.py --shapes tiny` calls 1 and 2, the smoke test's 10 s timeout included.
# Exits non-zero if anything fails. The work folder is removed on success (KEEP=1 keeps it); its
# results file and logs are kept on failure. SUITE_ARGS adds arguments to both suite calls.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

version="${1:-}"
if [[ -z "$version" ]]; then
    if python3.12 -c "" >/dev/null 2>&1; then version=3.12; else version=3.11; fi
fi
if ! "python$version" -c "" >/dev/null 2>&1; then
    echo "gpu_host_check: python$version does not run here" >&2
    exit 2
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-host-check.XXXXXX")
started=$SECONDS
step() { echo; echo "== [$((SECONDS - started))s] $*"; }

step "venv with python$version ($("python$version" --version 2>&1)) in $work"
"python$version" -m venv "$work/venv"
py="$work/venv/bin/python"
pip() { "$py" -m pip -q "$@"; }

step "torch 2.13.0 from the CPU wheel on this disk"
# Without an index first: only a wheel already on this disk (pip's find-links) can satisfy it, never
# a CUDA build from PyPI (gigabytes). Then its dependencies, torch itself already there.
if ! pip install --no-index --no-deps torch==2.13.0; then
    echo "gpu_host_check: no torch 2.13.0 wheel for Python $version on this disk; run it with 3.11" >&2
    exit 1
fi
pip install torch==2.13.0
"$py" -c "import torch; assert torch.version.cuda is None, torch.__version__; print('   torch', torch.__version__)"

step "the lent machine's packages"
numpy="numpy==2.5.2"
if ! pip install --dry-run --no-deps "$numpy" >/dev/null 2>&1; then
    numpy="numpy<2.5.2"  # the nearest release below it that has a wheel for this Python
fi
peft="peft==${HOST_PEFT:-0.17.1}"
pip install transformers==5.17.0 tokenizers==0.23.2 huggingface_hub==1.33.0 safetensors==0.8.0 "$numpy" \
    accelerate==1.15.0 "$peft" pillow
# The machine has no pydantic (its typer is older than the one that needs it) and may have an older
# typing-extensions than pydantic 2.14 needs: ours must come from the wheels.
"$py" -m pip uninstall -q -y pydantic pydantic-core annotated-types typing-inspection
pip install --no-deps typing-extensions==4.12.2
"$py" -m pip list --format=freeze | tr '\n' ' '
echo

step "the wheels (bench/gpu_wheels.sh $version)"
GPU_WHEELS_DIR="$work/whl" bash bench/gpu_wheels.sh "$version" 2>&1 | grep -v "^WARNING: Location" || true
ls "$work"/whl/*.whl "$work"/whl/fp8/*.whl >/dev/null

step "installed as README 'Benchmarks' says"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    "$work"/whl/*.whl
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site-fp8" \
    "$work"/whl/fp8/*.whl
export PYTHONPATH="$work/site:$root"
"$py" - "$work/site" <<'PY'
import importlib.metadata
import importlib.util
import sys

site = sys.argv[1]
ours = {"diffusers": "0.42.1", "transformers": "5.24.0", "peft": "0.21.2", "pydantic": "2.14.4",
        "pydantic-settings": "2.16.3", "typing-extensions": None, "requests": None}
wrong = []
for name, version in ours.items():
    found = importlib.metadata.distribution(name)
    where = str(found.locate_file(""))
    print(f"   {name} {found.version} from {where}")
    if found.version != (version or found.version) or not where.startswith(site):
        wrong.append(f"{name} {found.version} from {where} (want {version} from {site})")
if importlib.util.find_spec("torchao") is not None:
    wrong.append("torchao is importable on the main path: peft would import it")
for name in ("huggingface-hub", "tokenizers", "safetensors", "numpy", "accelerate", "torch"):
    print(f"   {name} {importlib.metadata.version(name)} (the machine's)")
if wrong:
    sys.exit("wrong copies: " + "; ".join(wrong))
PY

failed=0
for call in 1 2; do
    extra=()
    [[ $call == 2 ]] && extra=(--fp8-site "$work/site-fp8")
    step "bench/gpu_suite.py --shapes tiny --call $call"
    # shellcheck disable=SC2086 (SUITE_ARGS is split on purpose)
    if ! PYTHONUNBUFFERED=1 "$py" bench/gpu_suite.py --shapes tiny --call "$call" --out "$work/out/suite.json" \
        "${extra[@]}" ${SUITE_ARGS:-}; then
        echo "gpu_host_check: call $call failed"
        failed=1
    fi
done

step "done"
if [[ $failed != 0 ]]; then
    echo "gpu_host_check: FAILED; the venv, results and logs are in $work"
    exit 1
fi
if [[ "${KEEP:-0}" == 1 ]]; then
    echo "gpu_host_check: passed; kept $work"
else
    rm -rf "$work"
    echo "gpu_host_check: passed"
fi
