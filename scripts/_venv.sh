# Shared by scripts/demo and scripts/test: find Python 3.11+, make .venv, install the project.
# Usage: source scripts/_venv.sh; ensure_venv EXTRAS   (EXTRAS may be empty)

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11 python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: Flask-Cloakroom needs Python 3.11 or newer with the venv module;" \
        "none was found (set PYTHON=/path/to/python3.11)." >&2
    return 1
}

ensure_venv() {
    local extras="$1" venv="${CLOAKROOM_VENV:-.venv}" python spec stamp
    if [ ! -x "$venv/bin/python" ]; then
        python=$(pick_python)
        echo "==> creating $venv with $($python --version)"
        "$python" -m venv "$venv"
    fi
    spec="."
    [ -z "$extras" ] || spec=".[$extras]"
    stamp="$venv/.installed-${extras:-base}-$(cat pyproject.toml | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        echo "==> installing flask-cloakroom${extras:+[$extras]} into $venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
        touch "$stamp"
    fi
    VENV="$venv"
}
