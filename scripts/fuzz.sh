#!/usr/bin/env bash
# Runs every fuzz target in the module for a bounded time each.
#
# Go 1.26's fuzzing coordinator can fail a target with "context deadline
# exceeded" at the end of -fuzztime when a worker is busy (go.dev/issue/
# 75804, fixed in Go 1.27): a race in the coordinator, not a finding. Such
# a run wrote no failing input to testdata/fuzz, so that is what tells the
# two apart here: a failure with a new input (or any other message) fails.
set -euo pipefail
fuzztime=${1:-20s}
inputs() { if [ -d "$1" ]; then find "$1" -type f | wc -l; else echo 0; fi; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for pkg in $(go list ./...); do
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $target ($fuzztime)"
		corpus="$(go list -f '{{.Dir}}' "$pkg")/testdata/fuzz/$target"
		before=$(inputs "$corpus")
		if go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" 2>&1 | tee "$log"; then
			continue
		fi
		after=$(inputs "$corpus")
		if [ "$after" -eq "$before" ] && grep -qx '    context deadline exceeded' "$log"; then
			echo "fuzz: $target: the Go coordinator's deadline race (go.dev/issue/75804), no failing input: not a failure"
			continue
		fi
		exit 1
	done
done
