# Sourced by results/*/run_all.sh.
# step OUTPUT COMMAND...: runs COMMAND with stdout to OUTPUT.tmp, renamed to OUTPUT when it
# succeeds; skipped when OUTPUT exists, so a rerun continues where an interrupted one stopped.
step() {
  local out=$1; shift
  if [[ -s $out ]]; then echo "== $out exists, skipped"; return; fi
  echo "== $(date -u +%FT%TZ) $*"
  mkdir -p "$(dirname "$out")"
  "$@" > "$out.tmp"
  mv "$out.tmp" "$out"
}
