#!/usr/bin/env bash
# The test suite against other releases of the dependencies than constraints.txt pins, each in
# a fresh virtual environment of its own inside the clone (.venv-MODE):
#   tools/test_releases.sh newest   the newest releases pyproject.toml admits
#   tools/test_releases.sh oldest   the lowest transformers pyproject.toml admits (5.18.0)
#   tools/test_releases.sh freeze   after a green `newest`: write its versions to constraints.txt
# Extra arguments go to pytest (e.g. tests/test_families.py). torch stays 2.13.0, the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: tools/test_releases.sh newest|oldest|freeze [pytest arguments]}
shift
if [[ $mode == freeze ]]; then
    source .venv-newest/bin/activate
    {
        grep '^#' constraints.txt
        pip freeze --exclude-editable | sed 's/^torch==.*/torch==2.13.0/' | sort -f
    } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    git diff --stat constraints.txt
    exit 0
fi
case $mode in
    newest) pins=() ;;
    # the bound of pyproject.toml's "transformers>=5.18,<6"
    oldest) pins=("transformers==$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' \
                                   pyproject.toml).0") ;;
    *) echo "unknown mode $mode: newest, oldest or freeze" >&2; exit 2 ;;
esac
rm -rf ".venv-$mode"
python3 -m venv ".venv-$mode"
source ".venv-$mode/bin/activate"
pip install torch==2.13.0
pip install --upgrade -e ".[test]" "${pins[@]}"
pip list 2>/dev/null | grep -iE '^(transformers|datasets|peft|diffusers|torchdata) '
python -m pytest -q "$@"
