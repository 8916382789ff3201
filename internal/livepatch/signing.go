package livepatch

import (
	"bufio"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/modsign"
)

// ErrSignature means the kernel requires a module signature it cannot
// accept from this module; see SignatureError.
var ErrSignature = errors.New("module signature not accepted")

// Signing is how the running kernel treats module signatures: whether it
// requires a good one, and which keys it trusts for it.
type Signing struct {
	// SecureBoot is the UEFI SecureBoot variable (false without UEFI or
	// without efivarfs mounted).
	SecureBoot bool `json:"secure_boot"`
	// Lockdown is the lockdown mode (none, integrity, confidentiality);
	// empty when the kernel has no lockdown LSM or securityfs is not
	// mounted. Debian's kernel locks down to integrity under Secure Boot.
	Lockdown string `json:"lockdown,omitempty"`
	// Enforce is module.sig_enforce: signatures required even without
	// lockdown.
	Enforce bool `json:"sig_enforce"`
	// Keys are the asymmetric keys the kernel holds (built-in, UEFI db
	// and MOK ones among them), named as /proc/keys names them:
	// "SUBJECT: KEYID".
	Keys []string `json:"trusted_keys"`
}

// Required says whether the kernel refuses a module without a good
// signature by a key it trusts.
func (s *Signing) Required() bool {
	return s.Enforce || (s.Lockdown != "" && s.Lockdown != "none")
}

// Trusts says whether the kernel holds cert's key, so that a module
// signed with it loads.
func (s *Signing) Trusts(cert *x509.Certificate) bool {
	return slices.Contains(s.Keys, modsign.KeyDescription(cert))
}

// Signing reads the kernel's module signature policy and keys.
func (k *Kernel) Signing() (*Signing, error) {
	s := &Signing{Keys: []string{}}
	if b, err := os.ReadFile(k.path("/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c")); err == nil {
		// Four bytes of attributes, then the one-byte value.
		s.SecureBoot = len(b) == 5 && b[4] == 1
	}
	if b, err := os.ReadFile(k.path("/sys/kernel/security/lockdown")); err == nil {
		s.Lockdown = bracketed(string(b))
	}
	if b, err := os.ReadFile(k.path("/sys/module/module/parameters/sig_enforce")); err == nil {
		s.Enforce = strings.TrimSpace(string(b)) == "Y"
	}
	f, err := os.Open(k.path("/proc/keys"))
	if err != nil {
		return nil, fmt.Errorf("read the kernel's keys: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if d, ok := asymmetricKey(sc.Text()); ok {
			s.Keys = append(s.Keys, d)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read the kernel's keys: %w", err)
	}
	return s, nil
}

// bracketed is the selected word of a sysfs choice list: "none
// [integrity] confidentiality" gives integrity.
func bracketed(s string) string {
	for _, w := range strings.Fields(s) {
		if strings.HasPrefix(w, "[") && strings.HasSuffix(w, "]") {
			return strings.Trim(w, "[]")
		}
	}
	return ""
}

// asymmetricKey is the description of an asymmetric key's /proc/keys
// line. The line is eight columns (id, flags, usage, timeout, perm, uid,
// gid, type cut to 9 characters), then the description, then ": " and
// what the key's subtype says of it ("X509.rsa 4e7fc4b0 []"), which has
// no ": " of its own.
func asymmetricKey(line string) (string, bool) {
	rest := line
	for i := 0; i < 8; i++ {
		rest = strings.TrimLeft(rest, " ")
		sp := strings.IndexByte(rest, ' ')
		if sp < 0 {
			return "", false
		}
		if i == 7 && rest[:sp] != "asymmetri" {
			return "", false
		}
		rest = rest[sp+1:]
	}
	if i := strings.LastIndex(rest, ": "); i > 0 {
		return rest[:i], true
	}
	return "", false
}

// SignatureError says why the kernel would not take a module's
// signature, in terms an operator can act on.
type SignatureError struct {
	Module string `json:"module"`
	// Reason is "unsigned", "untrusted" (signed with a key the kernel
	// does not hold) or "corrupt" (the signature is malformed or does not
	// match the module).
	Reason string `json:"reason"`
	Signer string `json:"signer,omitempty"` // who signed it, as the signature names the signer
	Policy string `json:"policy"`           // why the kernel requires a signature
	Detail string `json:"detail,omitempty"`
}

func (e *SignatureError) Error() string {
	var what, fix string
	switch e.Reason {
	case "unsigned":
		what = "is not signed"
		fix = "publish it from a repository with a module-signing key (stitch keys signing init) and enroll that key's certificate on this machine (stitch agent enroll says how)"
	case "untrusted":
		what = "is signed by " + e.Signer + ", a key this kernel does not trust"
		fix = "enroll the fleet's module-signing certificate on this machine (stitch agent enroll says how; mokutil --import, then confirm at the next boot)"
	default:
		what = "has a signature the kernel cannot verify"
		if e.Signer != "" {
			what += " (signed by " + e.Signer + ")"
		}
		fix = "the module was changed after it was signed, or is damaged: fetch or publish it again"
	}
	msg := fmt.Sprintf("%s: %s %s, and this kernel loads only signed modules (%s): %s", ErrSignature, e.Module, what, e.Policy, fix)
	if e.Detail != "" {
		msg += "\n  kernel log:\n    " + strings.ReplaceAll(e.Detail, "\n", "\n    ")
	}
	return msg
}

func (e *SignatureError) Unwrap() error { return ErrSignature }

// Policy names why the kernel requires signatures.
func (s *Signing) Policy() string {
	var why []string
	if s.Lockdown != "" && s.Lockdown != "none" {
		w := "lockdown: " + s.Lockdown
		if s.SecureBoot {
			w += ", under UEFI Secure Boot"
		}
		why = append(why, w)
	}
	if s.Enforce {
		why = append(why, "module.sig_enforce")
	}
	return strings.Join(why, "; ")
}

// checkSignature refuses, before the kernel sees it, a module the kernel
// would refuse for want of a signature.
func (k *Kernel) checkSignature(path string, data []byte) error {
	s, err := k.Signing()
	if err != nil || !s.Required() {
		return nil // the kernel has the last word; this only explains it early
	}
	if _, _, err := modsign.Split(data); errors.Is(err, modsign.ErrUnsigned) {
		return &SignatureError{Module: path, Reason: "unsigned", Policy: s.Policy()}
	}
	return nil
}

// explainRefusal turns the kernel's refusal of a module for its
// signature (finit_module's errno) into a SignatureError; nil if the
// refusal was for something else.
func (k *Kernel) explainRefusal(path string, data []byte, err error, kernelLog string) error {
	var errno unix.Errno
	if !errors.As(err, &errno) {
		return nil
	}
	switch errno {
	case unix.EPERM, unix.ENOKEY, unix.EKEYREJECTED, unix.EBADMSG, unix.ENODATA, unix.ENOPKG:
	default:
		return nil
	}
	s, serr := k.Signing()
	if serr != nil || !s.Required() {
		return nil
	}
	e := &SignatureError{Module: path, Policy: s.Policy(), Detail: strings.TrimSpace(kernelLog)}
	_, sig, perr := modsign.Split(data)
	switch {
	case errors.Is(perr, modsign.ErrUnsigned):
		e.Reason = "unsigned"
	case perr != nil:
		e.Reason = "corrupt"
	case strings.Contains(kernelLog, "unavailable key"), errno == unix.EPERM, errno == unix.ENOKEY:
		// module_sig_check says "unavailable key" when it enforces
		// signatures itself (module.sig_enforce, set on Debian under
		// Secure Boot, gives EKEYREJECTED); lockdown alone refuses an
		// unknown key with EPERM, as an unsigned module.
		e.Reason, e.Signer = "untrusted", sig.Signer()
	default:
		e.Reason, e.Signer = "corrupt", sig.Signer()
	}
	return e
}
