#!/usr/bin/env bash
# The unit and simulation layers against the compiled build (setup.py, ZBROKER_COMPILE=1).
#
#   scripts/compiled.sh                      # build in a scratch copy, run -m "unit or sim"
#   scripts/compiled.sh --keep /tmp/zc       # ... in /tmp/zc, and leave it there
#   scripts/compiled.sh --keep /tmp/zc --build-only  # no tests: for `zbroker bench --compiled`
#   scripts/compiled.sh -- -m unit -x        # other pytest arguments (after --)
#   MYPYC_OPT_LEVEL=0 scripts/compiled.sh    # gcc -O0: half the build time (CI's check)
#
# The working tree as git sees it (edits and new files included; not .git, nor what
# .gitignore leaves out: what a build left, caches, .hypothesis, which a run of the pure
# layers may be writing meanwhile, as in .ci/run) is copied to a scratch directory and
# compiled there in place, with this environment's mypy (the test extra has it) and C
# compiler; pytest then runs from that copy, which comes first on sys.path, so the tree
# you work in never holds a compiled module that an edit would make stale. Each recorded
# core is checked to be loaded compiled before the tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(pwd)
scratch=""
build_only=""
usage="usage: scripts/compiled.sh [--keep DIR [--build-only]] [-- PYTEST ARGS...]"
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) scratch="$2" && shift 2 ;;
        --build-only) build_only=1 && shift ;;
        --) shift && break ;;
        *) echo "$usage" >&2 && exit 2 ;;
    esac
done
case "$tree/" in "$(realpath -m "${scratch:-/nonexistent}")"/*) # --keep empties DIR first
    echo "compiled.sh: --keep $scratch would remove this tree ($tree)" >&2 && exit 2 ;;
esac
[ -z "$build_only" ] || [ -n "$scratch" ] ||
    { echo "compiled.sh: --build-only builds for later: name where with --keep DIR" >&2 && exit 2; }
pytest_args=("$@")
[ ${#pytest_args[@]} -gt 0 ] || pytest_args=(-q -m "unit or sim")
if [ -z "$scratch" ]; then
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/zbroker-compiled.XXXXXX")
    trap 'rm -rf "$scratch"' EXIT
else
    rm -rf "$scratch" && mkdir -p "$scratch"
fi

git rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    { echo "compiled.sh: $tree is not a git checkout: it copies the files git lists" >&2 && exit 2; }
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' path; do
        if [ -e "$path" ] || [ -L "$path" ]; then printf '%s\0' "$path"; fi # not deleted
    done | tar -c --null -T - | tar -x -C "$scratch"

cd "$scratch"
start=$SECONDS
ZBROKER_COMPILE=1 python setup.py --quiet build_ext --inplace >build.log 2>&1 ||
    { tail -40 build.log >&2 && echo "compiled.sh: the build failed ($scratch/build.log)" >&2 && exit 1; }
echo "compiled.sh: built in $((SECONDS - start)) s in $scratch"

export PYTHONPATH="$scratch${PYTHONPATH:+:$PYTHONPATH}"
python - <<'EOF'
import json
from importlib import import_module
from importlib.machinery import EXTENSION_SUFFIXES

record = json.load(open("zbroker/compiled.json"))
for name in record["modules"]:
    path = import_module(name).__file__ or ""
    if not any(path.endswith(suffix) for suffix in EXTENSION_SUFFIXES):
        raise SystemExit(f"compiled.sh: {name} loads from {path}, not its compiled module")
print(
    f"compiled.sh: {len(record['modules'])} cores load compiled (-O{record['opt_level']}): "
    + ", ".join(record["modules"])
)
EOF
[ -z "$build_only" ] || exit 0

start=$SECONDS
status=0
python -m pytest -p no:cacheprovider "${pytest_args[@]}" || status=$?
echo "compiled.sh: pytest ${pytest_args[*]} took $((SECONDS - start)) s (exit $status)"
exit $status
