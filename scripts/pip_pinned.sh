# Sourced by scripts/setup_*.sh. pip_install_pinned VENV NAME KEEP PKG...: installs the pinned
# PKGs into VENV once (stamp file VENV/.complete-NAME-<hash of the pins>), constraining the
# already installed packages whose names match the regex KEEP to their current versions, so
# pip never replaces the LibTorch wheel (or other pins) the build and tests rely on.
pip_install_pinned() {
  local venv="$1" name="$2" keep="$3"
  shift 3
  local stamp="$venv/.complete-$name-$(printf '%s\n' "$@" | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  printf '[setup-%s] installing Python test tools: %s\n' "$name" "$*"
  local constraints
  constraints="$(mktemp)"
  "$venv/bin/python" -m pip freeze | grep -iE "^($keep)==" > "$constraints" || true
  "$venv/bin/python" -m pip install -q -c "$constraints" "$@"
  rm -f "$constraints"
  touch "$stamp"
}
