# Shared by the launch/*.sh wrappers (sourced, not run): where the project is, which `accelerate` to
# run, and how many GPUs this machine has.

# The project root, found from this file's own location, so the wrappers work from any directory.
# Relative paths in the training flags (--data-dir, --output-dir) stay relative to where you are.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIGS="$ROOT/configs/accelerate"

# Import distmnist from this checkout even if it was not pip-installed into the environment.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# `accelerate` of the active environment; failing that, of the project's .venv (the README's set-up).
# Override with ACCELERATE=/path/to/accelerate.
if [[ -z "${ACCELERATE:-}" ]]; then
    if command -v accelerate >/dev/null 2>&1; then
        ACCELERATE=accelerate
    elif [[ -x "$ROOT/.venv/bin/accelerate" ]]; then
        ACCELERATE="$ROOT/.venv/bin/accelerate"
    else
        echo "error: 'accelerate' not found: activate the environment where distmnist is installed" >&2
        echo "       (python3 -m venv .venv && .venv/bin/pip install -e .) or set ACCELERATE" >&2
        exit 2
    fi
fi

# Number of CUDA GPUs visible here (honours CUDA_VISIBLE_DEVICES); 0 on a CPU-only machine.
count_gpus() {
    local python
    python="$(dirname "$(command -v "$ACCELERATE")")/python"
    [[ -x "$python" ]] || python=python3
    "$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0
}

# Reject anything that is not a whole number >= min, naming the setting.
require_int() {  # name value min
    if ! [[ "$2" =~ ^[0-9]+$ ]] || (( $2 < $3 )); then
        echo "error: $1 must be a whole number >= $3, got '$2'" >&2
        exit 2
    fi
}
