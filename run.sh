#!/usr/bin/env bash
# smoltrain from a fresh clone in one command (Linux, Python 3.10+; no make needed):
#
#   ./run.sh smoke    a virtual environment with torch and the requirements; the first 2,000 documents of each
#                     SmolLM-Corpus subset (megabytes, read by HTTP range requests); config/smoke.py trained on them;
#                     a text sample from the model; what to run next
#   ./run.sh test     the same environment plus the optional extras; the test suite
#   ./run.sh setup    that environment only (CI then runs the test command in it)
#
# Arguments after the target go to train.py (smoke: e.g. --train_tokens=50000) or to pytest (test: e.g. -x -k data).
# Settings, from the environment:
#   SOURCE=DIR     smoke reads a local copy laid out like the hub (DIR/<subset>/train-*.parquet) instead
#   HF_ENDPOINT    a hub mirror (huggingface_hub's own variable)
#   DOCS=2000      smoke: documents per subset;  DATA=data/sample  where they go;  OUT=out/smoke  the run's folder
#   PYTHON=python3 the interpreter that makes the environment;  VENV=.venv  its folder (an existing one is reused)
#   TORCH=2.13.0   the torch release: the CPU build without an NVIDIA GPU, the CUDA build with one
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH=${TORCH:-2.13.0}
DOCS=${DOCS:-2000}
DATA=${DATA:-data/sample}
OUT=${OUT:-out/smoke}

say() { echo "[run.sh] $*" >&2; }
die() { echo "run.sh: error: $*" >&2; exit 1; }

setup() {  # the environment: venv, torch for this machine, then requirements files "$@"
    if [ ! -x "$VENV/bin/python" ]; then
        command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH; install Python 3.10+ or set PYTHON=/path/to/python3"
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
            die "$("$PYTHON" --version 2>&1) is too old: smoltrain needs Python 3.10+ (set PYTHON=python3.11, ...)"
        say "creating the virtual environment $VENV ($("$PYTHON" --version 2>&1))"
        "$PYTHON" -m venv "$VENV" ||
            die "$PYTHON -m venv failed; on Debian/Ubuntu: apt install python3-venv (or set VENV to an existing one)"
    fi
    py="$VENV/bin/python"
    local installed
    installed=$("$py" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
    if [ "${installed%%+*}" = "$TORCH" ]; then
        say "torch $installed is installed"
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        say "NVIDIA GPU found ($(nvidia-smi -L | head -n 1)): installing torch $TORCH, CUDA build"
        "$py" -m pip install -q "torch==$TORCH"
    else
        # PyPI's Linux wheel is the CUDA build (several GB of CUDA libraries); pytorch.org's CPU index has the CPU
        # one. One retry, not pip's five: a machine that reaches only a configured mirror (pip.conf find-links or
        # extra-index-url, which pip still reads) does not wait a minute on each package.
        say "no NVIDIA GPU: installing torch $TORCH, CPU build"
        "$py" -m pip install -q --retries 1 "torch==$TORCH" --index-url https://download.pytorch.org/whl/cpu
    fi
    installed=$("$py" -c "import torch; print(torch.__version__)" 2>/dev/null) || die "torch did not install (above)"
    for requirements in "$@"; do  # torch named again so that pip keeps the build installed above
        say "installing $requirements"
        "$py" -m pip install -q "torch==$installed" -r "$requirements"
    done
}

smoke() {
    setup requirements.txt
    local data=$DATA out=$OUT
    if [ -n "${SOURCE:-}" ]; then
        say "preparing the first $DOCS documents of each subset of $SOURCE into $data"
        "$py" prepare.py --source "$SOURCE" --docs "$DOCS" --out "$data" ||
            die "could not prepare $SOURCE (above); SOURCE must be laid out like the hub: SOURCE/<subset>/train-*.parquet"
    else
        say "downloading the first $DOCS documents of each subset of HuggingFaceTB/smollm-corpus into $data"
        "$py" prepare.py --docs "$DOCS" --out "$data" ||
            die "could not prepare the sample from the hub (above). With a local copy of the parquet files:" \
                "SOURCE=DIR ./run.sh smoke (DIR/<subset>/train-*.parquet, as on the hub)"
    fi
    say "training config/smoke.py on $data (Ctrl-C stops it; the same command resumes from the last checkpoint)"
    "$py" train.py config/smoke.py --data_dir="$data" --out_dir="$out" "$@"
    say "a sample from the model:"
    "$py" sample.py --out_dir="$out" --start="The" --max_new_tokens=60
    cat >&2 <<EOF
[run.sh] done. Next (inside the environment: source $VENV/bin/activate):
  python prepare.py --fraction 0.01                                   # more data: the first 1% of each subset's files
  torchrun --standalone --nproc_per_node=8 train.py config/deepone.py # all GPUs of a node
  python -m tools.plot $out                                           # loss curves (pip install -r requirements-extras.txt)
  python -m tools.export --out_dir=$out --to=hf/smoke                 # a Hugging Face transformers folder
EOF
}

tests() {
    setup requirements-dev.txt requirements-extras.txt
    "$py" -m pytest -q -n 2 tests "$@"  # the README's test command, as .ci/run runs it
}

target=${1:-}
[ $# -gt 0 ] && shift
case "$target" in
    smoke) smoke "$@" ;;
    test) tests "$@" ;;
    setup) setup requirements-dev.txt requirements-extras.txt ;;
    *) die "usage: ./run.sh smoke|test|setup [arguments for train.py or pytest] (got '${target}')" ;;
esac
