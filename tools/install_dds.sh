#!/usr/bin/env bash
# Install the CycloneDDS Python binding (cyclonedds==0.10.2, the version Unitree's SDK pins) into a venv.
#
#   tools/install_dds.sh [VENV]        (default: .venv)
#
# The binding is an sdist that compiles against a CycloneDDS C library found through CYCLONEDDS_HOME, a prefix
# holding include/, lib/ (with libddsc.so) and bin/. An existing CYCLONEDDS_HOME is honoured (on the robot it is
# usually ~/cyclonedds_ws/install/cyclonedds). Otherwise, on Debian/Ubuntu, the C library comes from the
# cyclonedds-dev package (installed here when running as root) and, since Debian spreads it over /usr/include and the
# multiarch lib dir, a small prefix of symlinks is made under build/cyclonedds-home. Idempotent: does nothing when
# the venv already imports cyclonedds 0.10.2.
set -euo pipefail

VERSION=0.10.2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"

fail() {
    echo "install_dds: FAILED: $*" >&2
    exit 1
}

[ -x "$PY" ] || fail "no Python at $PY (create the venv first, e.g. make's .venv)"

if "$PY" -c "import cyclonedds, sys; from importlib.metadata import version; \
sys.exit(0 if version('cyclonedds') == '$VERSION' else 1)" 2>/dev/null; then
    echo "install_dds: cyclonedds $VERSION already importable in $VENV"
    exit 0
fi

# A prefix is usable when the sdist's setup.py would accept it: include/, bin/, lib/ or lib64/ with libddsc.so.
good_prefix() {
    local p="$1"
    [ -d "$p/include/dds" ] && [ -d "$p/bin" ] && { [ -e "$p/lib/libddsc.so" ] || [ -e "$p/lib64/libddsc.so" ]; }
}

if [ -n "${CYCLONEDDS_HOME:-}" ]; then
    good_prefix "$CYCLONEDDS_HOME" || fail "CYCLONEDDS_HOME=$CYCLONEDDS_HOME lacks include/dds, bin/ or lib/libddsc.so"
    HOME_DIR="$CYCLONEDDS_HOME"
    echo "install_dds: using CYCLONEDDS_HOME=$HOME_DIR"
else
    MULTIARCH="$(gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || true)"
    LIBDIR=""
    for d in "/usr/lib/$MULTIARCH" /usr/lib /usr/lib64 /usr/local/lib; do
        if [ -e "$d/libddsc.so" ]; then LIBDIR="$d"; break; fi
    done
    if [ -z "$LIBDIR" ] || [ ! -e /usr/include/dds/dds.h ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "install_dds: installing Debian packages cyclonedds-dev (CycloneDDS C library $VERSION), cyclonedds-tools"\
                 "(idlc, for the type-information test) and gcc"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -q || fail "apt-get update"
            apt-get install -y -q cyclonedds-dev cyclonedds-tools gcc python3-dev || fail "apt-get install cyclonedds-dev"
            for d in "/usr/lib/$MULTIARCH" /usr/lib /usr/lib64; do
                if [ -e "$d/libddsc.so" ]; then LIBDIR="$d"; break; fi
            done
        else
            fail "no CycloneDDS C library found. Install it: 'sudo apt-get install cyclonedds-dev' (Debian bookworm /
Ubuntu 24.04 ship 0.10.x), or build CycloneDDS 0.10.x from source and set CYCLONEDDS_HOME to its install prefix."
        fi
    fi
    [ -n "$LIBDIR" ] && [ -e /usr/include/dds/dds.h ] || fail "cyclonedds-dev installed but libddsc.so/dds.h not found"
    HOME_DIR="$ROOT/build/cyclonedds-home"
    mkdir -p "$HOME_DIR/bin"
    ln -sfn /usr/include "$HOME_DIR/include"
    ln -sfn "$LIBDIR" "$HOME_DIR/lib"
    if command -v idlc >/dev/null 2>&1; then ln -sfn "$(command -v idlc)" "$HOME_DIR/bin/idlc"; fi
    echo "install_dds: prefix $HOME_DIR -> /usr/include, $LIBDIR"
fi

echo "install_dds: pip install cyclonedds==$VERSION into $VENV (compiles the C extension)"
if ! CYCLONEDDS_HOME="$HOME_DIR" "$PY" -m pip install -q --no-binary cyclonedds "cyclonedds==$VERSION"; then
    fail "pip could not build cyclonedds==$VERSION against $HOME_DIR (needs gcc and the Python headers, python3-dev)"
fi
# Import with CYCLONEDDS_HOME unset: at run time the library is found through the loader (ldconfig) or the path
# recorded at build time, so nobody has to export CYCLONEDDS_HOME to run wam-edge.
env -u CYCLONEDDS_HOME "$PY" -c "import cyclonedds.domain" || fail "cyclonedds installed but does not import"
echo "install_dds: cyclonedds $VERSION OK in $VENV"
