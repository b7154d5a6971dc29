#!/usr/bin/env bash
# test-matrix.sh [PYTEST ARGS...]: the test suite on every Nix version users run.
#
#   bookworm  Nix 2.8   the whole suite (unit, lab, engine, e2e, SDKs, examples, release artifacts)
#   trixie    Nix 2.26  lab, engine and end-to-end tests (deployer and lab hosts on 2.26)
#   sid       Nix 2.34  the same on 2.34, and the fault suite (tests/test_faults.py)
#                       whose quick form bookworm runs too: the oldest and the newest Nix
#
# bookworm runs beside trixie-then-sid. Each leg runs in scripts/in-release.sh: a private mount namespace with an
# empty /nix and no /etc/nix/nix.conf or nixbld group, the fresh-machine
# condition. The systemd lab hosts boot their own roots, so every leg also
# pushes across versions. TEST_RELEASES="sid" runs one leg.
# The last line counts every leg: "matrix: N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."

read -r -a legs <<< "${TEST_RELEASES:-bookworm trixie sid}"
# What depends on the Nix version. Unit tests, recorded-output tests, SDK
# generation and the Node/Go examples do not, and run once, in bookworm.
VERSIONED_TESTS=(tests/test_lab.py tests/test_engine.py tests/test_provider_e2e.py tests/test_fleet_e2e.py
                 tests/test_evaluation.py tests/test_real_nixos_e2e.py
                 tests/test_preview_e2e.py tests/test_install_e2e.py tests/test_secret_files_e2e.py
                 tests/test_binary_cache_e2e.py tests/test_sudo_e2e.py tests/test_generations_e2e.py
                 tests/test_no_flake_e2e.py tests/test_reboot_e2e.py tests/test_flake.py tests/test_substitution_e2e.py
                 tests/test_build_host_e2e.py)
for f in tests/test_systemd.py; do [[ -f $f ]] && VERSIONED_TESTS+=("$f"); done

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
# Each leg has its own lab addresses (127.0.NET.x, see tests/conftest.py) and
# lab directory, so legs can run side by side: they mostly wait on hosts.
declare -A net=([bookworm]=20 [trixie]=45 [sid]=60)  # each leg uses NET-1 to NET+9
declare -A nixver
run_leg() { # run_leg LEG: the leg's tests into $logs/LEG.log, its exit code and seconds beside it
  local leg=$1 started files
  started=$(date +%s)
  case $leg in
    bookworm) files=(tests) ;;
    sid) files=("${VERSIONED_TESTS[@]}" tests/test_faults.py) ;;
    *) files=("${VERSIONED_TESTS[@]}") ;;
  esac
  bash scripts/in-release.sh "$leg" env PULUMI_NIXOS_LEG="$leg" LAB_TEST_NET="${net[$leg]:-70}" \
    python -m pytest -p no:cacheprovider --basetemp="/tmp/pytest-leg-$leg" "${files[@]}" "${pytest_args[@]}" \
    > "$logs/$leg.log" 2>&1
  echo $? > "$logs/$leg.rc"
  echo $(( $(date +%s) - started )) > "$logs/$leg.seconds"
}
pytest_args=("$@")
for leg in "${legs[@]}"; do
  nixver[$leg]="$(bash scripts/in-release.sh "$leg" nix --version 2>&1 | tail -n1)"
  echo "=== leg $leg: ${nixver[$leg]} (lab hosts on 127.0.${net[$leg]:-70}.x)"
done
# Two lanes on the two cores: the long bookworm leg, and the others one
# after another. Three legs at once left too little CPU for timeouts.
lanes=()
others=()
for leg in "${legs[@]}"; do
  if [[ $leg == bookworm ]]; then run_leg bookworm & lanes+=($!); else others+=("$leg"); fi
done
if ((${#others[@]})); then
  ( for leg in "${others[@]}"; do run_leg "$leg"; done ) & lanes+=($!)
fi
for lane in "${lanes[@]}"; do wait "$lane"; done

total_passed=0 total_failed=0 status=0
declare -A summary
for leg in "${legs[@]}"; do
  rc="$(cat "$logs/$leg.rc" 2>/dev/null || echo 1)"
  echo
  echo "=== leg $leg: ${nixver[$leg]} (exit $rc)"
  cat "$logs/$leg.log"
  line="$(grep -E '^=+ .*(passed|failed|error|no tests ran).* in [0-9.]+s' "$logs/$leg.log" | tail -n1 | sed 's/^=* //; s/ =*$//')"
  passed=$(grep -oE '[0-9]+ passed' <<< "$line" | cut -d' ' -f1); passed=${passed:-0}
  failed=$(grep -oE '[0-9]+ (failed|errors?)' <<< "$line" | awk '{s+=$1} END {print s+0}')
  if [[ $rc -ne 0 && $failed -eq 0 ]]; then failed=1; fi  # a leg that crashed counts as a failure
  ((rc != 0)) && status=1
  total_passed=$((total_passed + passed)); total_failed=$((total_failed + failed))
  summary[$leg]="${line:-no summary (exit $rc)} [$(cat "$logs/$leg.seconds" 2>/dev/null || echo '?')s]"
done

echo
echo "=== test matrix"
for leg in "${legs[@]}"; do
  printf '%-9s %-22s %s\n' "$leg" "${nixver[$leg]}" "${summary[$leg]}"
done
# CI shows only the tail of this output: name what failed where it is seen.
for leg in "${legs[@]}"; do
  grep -E '^(FAILED|ERROR) ' "$logs/$leg.log" | cut -c1-300 | sed "s/^/$leg: /"
done
echo "matrix: $total_passed passed, $total_failed failed"
exit $status
