#!/usr/bin/env bash
# Runs every fuzz target in the module for a bounded time each. Minimizing
# a new interesting input is bounded too: its default (60 s) outlasts a
# short run, which then fails with "context deadline exceeded".
set -euo pipefail
fuzztime=${1:-20s}
for pkg in $(go list ./...); do
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $target ($fuzztime)"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 5s "$pkg"
	done
done
