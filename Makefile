# The two commands of the README: 'make demo' and 'make test'.
# Both install their dependencies first (Debian/Ubuntu, as root).

GO ?= go
# Static: the same binary runs on the host and as /init inside test VMs.
export CGO_ENABLED = 0

.PHONY: deps build demo test fuzz kernels

deps:
	./scripts/install-deps.sh

build:
	$(GO) build -o bin/stitch ./cmd/stitch

demo: deps build
	./bin/stitch demo

# The kernels the tests build for besides the installed one, fetched into
# the cache (/var/cache/stitch) from the apt archive; the tests read the
# list too (testutils.TestKernels). The VM tests also boot 6.12.117
# (testutils.VMKernels), so it must stay in the list.
TEST_KERNELS ?= 6.1.0-47-amd64 6.1.0-53-amd64 6.1.0-57-amd64 6.12.117+deb12-amd64
export TEST_KERNELS
kernels: build
	./bin/stitch kernel add $(TEST_KERNELS)

# Unit, integration and VM tests, then each fuzz target for a short time.
# -p 1: one package at a time, so that no two QEMU guests share the two
# cores (under TCG they starve each other). The storage tests get a
# throwaway PostgreSQL on loopback (scripts/postgres.sh).
test: deps kernels
	$(GO) vet ./...
	export "$$(./scripts/postgres.sh)" && $(GO) test -p 1 -count=1 -timeout 80m ./...
	./scripts/postgres.sh stop
	$(MAKE) fuzz

FUZZTIME ?= 20s
fuzz:
	./scripts/fuzz.sh $(FUZZTIME)
