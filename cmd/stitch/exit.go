package main

import (
	"errors"
	"flag"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/klpmod"
	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/vm"
)

// Exit codes, documented in README.md. `stitch vm` exits with the guest
// command's own status, or exitVMTimeout / exitVMFailed.
const (
	exitOK          = 0
	exitFailed      = 1 // the operation failed (the kernel refused, I/O error, ...)
	exitUsage       = 2 // bad input: flags, arguments, a file that is not what it should be
	exitUnsupported = 3 // this system can't do it: no livepatch in the kernel, not root, a kernel's source not in the archive
	exitBusy        = 4 // another livepatch transition is in progress
	exitRolledBack  = 5 // the transition timed out and was rolled back
	exitTrouble     = 6 // the kernel warned or oopsed after patching; reverted
	exitRefused     = 7 // build: the fix cannot be live-patched safely, or was not built for this kernel's code; a repository's signatures do not verify; the kernel requires a module signature it cannot accept
	// stitch status: the machine's coverage, for monitoring checks.
	exitPending     = 8  // patches offered but not applied yet
	exitNotCovered  = 9  // no agent, no livepatch, loading off, or a patch failed or is not loaded
	exitStatusError = 10 // the agent's check-ins fail or are overdue
	// A patch had to be taken out again and could not be: the kernel may
	// hold it partly applied.
	exitRollbackFailed = 11
	// build for several kernels: some were built (or already contain the
	// fixes), others not.
	exitSomeBuilt = 12
	exitVMTimeout = 124
	exitVMFailed  = 125
)

// usageError marks bad command-line input.
type usageError struct{ err error }

func (u usageError) Error() string { return u.err.Error() }
func (u usageError) Unwrap() error { return u.err }

// silentExit carries an exit code whose reason was already printed.
type silentExit struct{ code int }

func (s silentExit) Error() string { return "exit status" }

func exitCode(err error) int {
	var silent silentExit
	var usage usageError
	switch {
	case errors.As(err, &silent):
		return silent.code
	case errors.As(err, &usage), errors.Is(err, flag.ErrHelp):
		return exitUsage
	case errors.Is(err, livepatch.ErrRollbackFailed): // before the stall or trouble it wraps
		return exitRollbackFailed
	case errors.Is(err, livepatch.ErrTimeout):
		return exitRolledBack
	case errors.Is(err, livepatch.ErrKernelTrouble):
		return exitTrouble
	case errors.Is(err, livepatch.ErrBusy), errors.Is(err, agent.ErrLocked):
		return exitBusy
	case errors.Is(err, livepatch.ErrNotRoot), errors.Is(err, livepatch.ErrUnsupported),
		errors.Is(err, kbuild.ErrNoSource), errors.Is(err, kbuild.ErrCompiler), errors.Is(err, kbuild.ErrNoHeaders),
		errors.Is(err, kernel.ErrMissing), errors.Is(err, kernel.ErrIncomplete), errors.Is(err, kernel.ErrNoLists), errors.Is(err, kernel.ErrNotRoot),
		errors.Is(err, kbuild.ErrNoPatchTool):
		return exitUnsupported
	case errors.Is(err, build.ErrUnpatchable), errors.Is(err, build.ErrRunPre), errors.Is(err, build.ErrNothing),
		errors.Is(err, klpmod.ErrUnpatchable), errors.Is(err, bundle.ErrVerify), errors.Is(err, livepatch.ErrSignature),
		errors.Is(err, agent.ErrCertificate):
		return exitRefused
	case errors.Is(err, layout.ErrNoLayout): // the kernel cannot say its special sections' formats
		return exitUnsupported
	case isBadInput(err):
		return exitUsage
	case errors.Is(err, vm.ErrTimeout):
		return exitVMTimeout
	case errors.Is(err, vm.ErrNoExit), errors.Is(err, vm.ErrSetup):
		return exitVMFailed
	}
	return exitFailed
}

// isBadInput tells the errors that mean the caller gave us something
// unusable.
func isBadInput(err error) bool {
	for _, e := range []error{
		kmod.ErrNotELF, kmod.ErrNotModule, kmod.ErrNotLivepatch, kmod.ErrVermagic,
		livepatch.ErrUnknownPatch, livepatch.ErrAlreadyLoaded, livepatch.ErrWrongKernel,
		build.ErrBadFix, build.ErrNoVariant, contract.ErrBadManifest, contract.ErrBadContained,
		bundle.ErrBadBundle, bundle.ErrExists, bundle.ErrNoRepo, rollout.ErrBadPolicy,
		api.ErrBadRequest, api.ErrUnauthorized, api.ErrForbidden, agent.ErrNotEnrolled, agent.ErrBadCA,
		kernel.ErrUnknown, kernel.ErrBadRelease, kernel.ErrSystem,
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
