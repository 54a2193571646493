#!/bin/bash
# The release gate: run the release suite on two nodes in parallel (the platform's rule: 20x
# green on two nodes), then gate on its verdict and on its KPIs against the committed
# baseline; and explore five fixed seeds (generated histories checked against a model), which
# must find nothing. Exits 0 only when the release may ship.
# Usage (as root, after scripts/setup-host): [NODES="ssh://archy@a ssh://archy@b"] \
#   [SSH_IDENTITY=key] examples/create-release.sh [VERSION]
# NODES defaults to two local nodes-in-a-box; hosts are set up with `archy-chaos node provision`.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-$(git describe --tags --always)}
out=reports/out/release-$version
seed=${SEED:-$(date +%s)}
nodes=()
for n in ${NODES:-local local}; do nodes+=(--node "$n"); done

cargo build --release --locked
rc=0
./target/release/archy-chaos run release "${nodes[@]}" --seed "$seed" --report-dir "$out" \
  ${SSH_IDENTITY:+--identity "$SSH_IDENTITY"} ${PUSHGATEWAY:+--pushgateway "$PUSHGATEWAY"} || rc=$?
report=$(ls -t "$out"/*.json | head -1)
./target/release/archy-chaos report "$report" --format md > "$out/report.md"
./target/release/archy-chaos report "$report" --format junit > "$out/junit.xml"
# 0 ship, 1 a scenario, threshold or KPI regression failed, 2 the run could not decide.
gate=0
./target/release/archy-chaos gate "$report" --suite release --baseline reports/baseline.json \
  ${PUSHGATEWAY:+--pushgateway "$PUSHGATEWAY"} || gate=$?
# Fixed seeds, so a release is judged on the same histories as the one before it; what one
# finds is shrunk into scenarios/found/ for the fix's regression test.
for s in ${EXPLORE_SEEDS:-101 102 103 104 105}; do
  x=0
  ./target/release/archy-chaos explore --seed "$s" --ops 200 --clients 3 --budget 10m \
    --shrink-budget 10m --report-dir "$out/explore" || x=$?
  if [ "$x" -eq 1 ] || { [ "$x" -ne 0 ] && [ "$gate" -ne 1 ]; }; then gate=$x; fi
done
if [ "$rc" -ne 0 ] || [ "$gate" -ne 0 ]; then
  echo "release $version blocked (run exit $rc, gate exit $gate): see $out/report.md" >&2
  # A failure beats an unknown, as in every verdict of archy-chaos.
  if [ "$rc" -eq 1 ] || [ "$gate" -eq 1 ]; then exit 1; fi
  exit $(( gate > rc ? gate : rc ))
fi
echo "release $version may ship: $out/report.md"
