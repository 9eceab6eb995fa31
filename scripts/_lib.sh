# Shared by scripts/serve and scripts/test (sourced, not run).
#
# Both scripts run from the repository root and keep their Python environment in .venv.
# Requirements are installed again only when a requirements file changed since the last
# install (a hash of the files is kept inside .venv), so a second run starts at once.

VENV=.venv
VENV_PY=$VENV/bin/python

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The interpreter that creates the venv: $PYTHON if set, else python3.11, else a python3
# that is at least 3.11.
find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    if [ -x "$VENV_PY" ] && "$VENV_PY" -c 'import sys' 2>/dev/null; then
        return 0
    fi
    local python
    python=$(find_python) || die "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)"
    say "creating $VENV with $python"
    rm -rf "$VENV"
    "$python" -m venv "$VENV" || die "could not create $VENV (is the venv module installed?)"
}

_requirements_hash() {
    cat "$@" | sha256sum | cut -d' ' -f1
}

# install_requirements FILE [FILES IT INCLUDES...]
# e.g. install_requirements requirements-dev.txt requirements.txt
install_requirements() {
    local main=$1
    local stamp="$VENV/.installed-$main.sha256"
    local want
    want=$(_requirements_hash "$@")
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    say "installing $main into $VENV"
    "$VENV_PY" -m pip install --disable-pip-version-check --quiet -r "$main" ||
        die "pip could not install $main"
    printf '%s\n' "$want" >"$stamp"
}

# The development tools from npm (package.json: TypeScript), installed into node_modules
# with `npm ci` again only when package-lock.json changed since the last install.
ensure_node_modules() {
    command -v npm >/dev/null 2>&1 || die "npm (Node.js 20 or newer) is needed for the JavaScript checks"
    local stamp=node_modules/.installed-package-lock.sha256
    local want
    want=$(_requirements_hash package-lock.json)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    say "installing package-lock.json into node_modules"
    npm ci --no-audit --no-fund --loglevel=error >&2 || die "npm ci failed"
    printf '%s\n' "$want" >"$stamp"
}
