package vm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// SecureBoot makes what a VM needs to boot with UEFI Secure Boot on under
// keys the caller controls, the way a machine owner takes control of a
// machine's firmware: its own PK, KEK and db (made here), a variable store
// that holds them, and the kernel image signed for that db. Debian's
// kernel then boots locked down (integrity) and loads only modules signed
// by a key it trusts, and it trusts db's keys for modules too: DB adds
// certificates to db for that, such as a fleet's module-signing
// certificate.
//
// The store is enrolled by a first boot in setup mode, in which the guest
// writes db, KEK and PK through efivarfs, signed by efitools on the host;
// the kernel is signed with sbsigntool's sbsign.
type SecureBoot struct {
	Dir     string   // keys, the variable store and the signed kernel; kept and reused
	Kernel  string   // boot image to sign
	Modules string   // the kernel's module directory (efivarfs is a module)
	DB      []string // more certificates (PEM or DER files) to enroll in db
	Init    string   // static stitch binary for the enrolling boot; the running executable if empty

	// Firmware is OVMF's Secure Boot build and Template its empty
	// variable store; Debian's ovmf paths if empty.
	Firmware, Template string
	Logger             *slog.Logger
}

// Debian's ovmf package: the 4 MiB Secure Boot build (SMM) and its empty
// variable store, which starts in setup mode.
const (
	OVMFSecureBootCode = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
	OVMFVarsTemplate   = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// SecureBootVM is what Prepare made: boot Kernel with UEFI.
type SecureBootVM struct {
	Kernel string // the image signed for db
	UEFI   *UEFI
}

// ErrSecureBootTools means a host tool Prepare needs is missing.
var ErrSecureBootTools = errors.New("secure boot tools missing")

// Prepare makes the keys, the enrolled variable store and the signed
// kernel, or reuses what an earlier call with the same inputs left in
// Dir. Each VM run may write to the store, so callers that want a
// pristine one copy Vars first.
func (s *SecureBoot) Prepare(ctx context.Context) (*SecureBootVM, error) {
	if s.Firmware == "" {
		s.Firmware = OVMFSecureBootCode
	}
	if s.Template == "" {
		s.Template = OVMFVarsTemplate
	}
	for _, f := range []string{s.Firmware, s.Template} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("%w: %v (apt-get install ovmf)", ErrSecureBootTools, err)
		}
	}
	for _, t := range []struct{ bin, pkg string }{{"cert-to-efi-sig-list", "efitools"}, {"sign-efi-sig-list", "efitools"}, {"sbsign", "sbsigntool"}, {"sbattach", "sbsigntool"}} {
		if _, err := exec.LookPath(t.bin); err != nil {
			return nil, fmt.Errorf("%w: %s not found (apt-get install %s)", ErrSecureBootTools, t.bin, t.pkg)
		}
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, err
	}
	out := &SecureBootVM{
		Kernel: filepath.Join(s.Dir, "vmlinuz.signed"),
		UEFI:   &UEFI{Code: s.Firmware, Vars: filepath.Join(s.Dir, "vars.fd")},
	}
	stamp, err := s.stamp()
	if err != nil {
		return nil, err
	}
	stampFile := filepath.Join(s.Dir, "inputs")
	if old, err := os.ReadFile(stampFile); err == nil && string(old) == stamp {
		return out, nil
	}
	os.Remove(stampFile)
	for _, role := range []string{"PK", "KEK", "db"} {
		if err := s.makeKey(role); err != nil {
			return nil, fmt.Errorf("secure boot %s key: %w", role, err)
		}
	}
	enroll, err := s.authVars(ctx)
	if err != nil {
		return nil, err
	}
	if err := s.signKernel(ctx, out.Kernel); err != nil {
		return nil, err
	}
	tmpl, err := os.ReadFile(s.Template)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(out.UEFI.Vars, tmpl, 0o600); err != nil {
		return nil, err
	}
	// The enrolling boot is in setup mode, so no image check yet; the
	// firmware checks each variable's signature as it is written.
	res, err := Run(ctx, Options{
		Kernel: out.Kernel, Init: s.Init, Modules: s.Modules, Logger: s.Logger,
		UEFI:    &UEFI{Code: s.Firmware, Vars: out.UEFI.Vars, Enroll: enroll},
		Timeout: 10 * time.Minute,
	})
	if err != nil {
		return nil, fmt.Errorf("enroll secure boot keys: %w", err)
	}
	if res.ExitCode != 0 {
		return nil, fmt.Errorf("enroll secure boot keys: guest exited %d: %s", res.ExitCode, strings.TrimSpace(res.Output))
	}
	if err := os.WriteFile(stampFile, []byte(stamp), 0o600); err != nil {
		return nil, err
	}
	return out, nil
}

// stamp names the inputs: the kernel, the extra db certificates and the
// firmware. A change in any of them makes Prepare start again.
func (s *SecureBoot) stamp() (string, error) {
	h := sha256.New()
	for _, f := range append([]string{s.Kernel, s.Firmware, s.Template}, s.DB...) {
		data, err := os.ReadFile(f)
		if err != nil {
			return "", fmt.Errorf("secure boot: %w", err)
		}
		fmt.Fprintf(h, "%s %d\n", filepath.Base(f), len(data))
		h.Write(data)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// makeKey writes ROLE.key and ROLE.crt: a self-signed RSA-2048
// certificate, which is what OVMF verifies signatures with.
func (s *SecureBoot) makeKey(role string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "Stitch test " + role},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(s.Dir, role+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(s.Dir, role+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// ownerGUID owns the signature list entries this package enrolls.
const ownerGUID = "53746974-6368-4000-8000-000000000001"

// authVars makes PK, KEK and db as signed updates: PK signs itself and
// KEK, KEK signs db. db holds the db certificate and s.DB.
func (s *SecureBoot) authVars(ctx context.Context) ([]EFIVar, error) {
	p := func(name string) string { return filepath.Join(s.Dir, name) }
	certs := map[string][]string{"PK": {p("PK.crt")}, "KEK": {p("KEK.crt")}, "db": {p("db.crt")}}
	for i, c := range s.DB {
		pemFile := p(fmt.Sprintf("db-extra-%d.crt", i))
		if err := toPEM(c, pemFile); err != nil {
			return nil, fmt.Errorf("secure boot db certificate %s: %w", c, err)
		}
		certs["db"] = append(certs["db"], pemFile)
	}
	signer := map[string]string{"PK": "PK", "KEK": "PK", "db": "KEK"}
	var vars []EFIVar
	for _, v := range []string{"db", "KEK", "PK"} {
		var esl []byte
		for i, c := range certs[v] {
			part := p(fmt.Sprintf("%s-%d.esl", v, i))
			if err := run(ctx, "cert-to-efi-sig-list", "-g", ownerGUID, c, part); err != nil {
				return nil, err
			}
			b, err := os.ReadFile(part)
			if err != nil {
				return nil, err
			}
			esl = append(esl, b...)
		}
		if err := os.WriteFile(p(v+".esl"), esl, 0o600); err != nil {
			return nil, err
		}
		by := signer[v]
		if err := run(ctx, "sign-efi-sig-list", "-g", ownerGUID, "-k", p(by+".key"), "-c", p(by+".crt"), v, p(v+".esl"), p(v+".auth")); err != nil {
			return nil, err
		}
		data, err := os.ReadFile(p(v + ".auth"))
		if err != nil {
			return nil, err
		}
		guid := GUIDGlobalVariable
		if v == "db" {
			guid = GUIDImageSecurityDatabase
		}
		vars = append(vars, EFIVar{Name: v, GUID: guid, Attrs: AttrsAuthenticated, Data: data})
	}
	return vars, nil
}

// signKernel signs the boot image for db, dropping the signatures it came
// with (Debian's, for the Microsoft-rooted chain).
func (s *SecureBoot) signKernel(ctx context.Context, out string) error {
	unsigned := filepath.Join(s.Dir, "vmlinuz.unsigned")
	if err := run(ctx, "sbattach", "--remove", "--output", unsigned, s.Kernel); err != nil {
		// An image without a signature has nothing to remove.
		data, rerr := os.ReadFile(s.Kernel)
		if rerr != nil {
			return rerr
		}
		if err := os.WriteFile(unsigned, data, 0o600); err != nil {
			return err
		}
	}
	return run(ctx, "sbsign", "--key", filepath.Join(s.Dir, "db.key"), "--cert", filepath.Join(s.Dir, "db.crt"), "--output", out, unsigned)
}

// toPEM copies a certificate file, PEM or DER, as PEM.
func toPEM(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if b, _ := pem.Decode(data); b != nil && b.Type == "CERTIFICATE" {
		return os.WriteFile(dst, data, 0o644)
	}
	if _, err := x509.ParseCertificate(data); err != nil {
		return fmt.Errorf("neither a PEM nor a DER certificate: %w", err)
	}
	return os.WriteFile(dst, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: data}), 0o644)
}

func run(ctx context.Context, name string, args ...string) error {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", name, err, tail(out.String(), 5))
	}
	return nil
}
