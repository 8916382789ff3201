package vm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// UEFI boots the guest through OVMF, the UEFI firmware for QEMU in
// Debian's ovmf package, instead of SeaBIOS. The kernel still comes from
// -kernel: OVMF loads it through QEMU's firmware configuration interface
// and, with Secure Boot on, checks its signature against db first.
//
// OVMF's Secure Boot builds keep the variable store on flash that only
// System Management Mode may write, so the machine is a q35 with SMM;
// without that, anything in the guest could rewrite db.
type UEFI struct {
	Code string // firmware code, mapped read-only (OVMF_CODE_4M.secboot.fd)
	Vars string // variable store, read-write: what the guest enrolls stays in this file
	// Enroll are variables the guest writes through efivarfs before its
	// command runs, in order: how a store in setup mode receives its
	// db, KEK and PK (PK last: it ends setup mode).
	Enroll []EFIVar
}

// EFIVar is one UEFI variable to write.
type EFIVar struct {
	Name  string `json:"name"` // e.g. "db"
	GUID  string `json:"guid"` // the vendor GUID, e.g. GUIDImageSecurityDatabase
	Attrs uint32 `json:"attrs"`
	Data  []byte `json:"data"` // for PK, KEK and db: an EFI_VARIABLE_AUTHENTICATION_2 header and signature lists
}

// Vendor GUIDs and attributes of the Secure Boot variables (UEFI spec,
// "Globally Defined Variables" and "Image Execution Information Table").
const (
	GUIDGlobalVariable        = "8be4df61-93ca-11d2-aa0d-00e098032b8c" // PK, KEK, SecureBoot, SetupMode
	GUIDImageSecurityDatabase = "d719b2cb-3d3a-4596-a3bc-dad00e67656f" // db, dbx

	// AttrsAuthenticated is non-volatile, boot and runtime access, and
	// time-based authenticated writes: what PK, KEK and db are stored with.
	AttrsAuthenticated = 0x1 | 0x2 | 0x4 | 0x20
)

// efivarsDir is where the guest mounts efivarfs.
const efivarsDir = "/sys/firmware/efi/efivars"

func (u *UEFI) qemuArgs() ([]string, error) {
	for _, f := range []struct{ what, path string }{{"UEFI firmware code", u.Code}, {"UEFI variable store", u.Vars}} {
		if f.path == "" {
			return nil, fmt.Errorf("%s: no file given", f.what)
		}
		if _, err := os.Stat(f.path); err != nil {
			return nil, fmt.Errorf("%s: %v (apt-get install ovmf)", f.what, err)
		}
	}
	return []string{
		"-machine", "q35,smm=on",
		"-global", "driver=cfi.pflash01,property=secure,value=on",
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + qemuEscape(u.Code),
		"-drive", "if=pflash,format=raw,unit=1,file=" + qemuEscape(u.Vars),
	}, nil
}

// guestEFIVars mounts efivarfs and writes the variables to enroll.
func guestEFIVars(enroll []EFIVar) error {
	if _, err := os.Stat("/sys/firmware/efi"); err != nil {
		return errors.New("the guest did not boot through UEFI (no /sys/firmware/efi)")
	}
	if err := Modprobe("efivarfs"); err != nil {
		return err
	}
	if err := unix.Mount("efivarfs", efivarsDir, "efivarfs", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mount efivarfs on %s: %w", efivarsDir, err)
	}
	for _, v := range enroll {
		if err := writeEFIVar(v); err != nil {
			return err
		}
	}
	return nil
}

// writeEFIVar writes one variable: efivarfs takes the attributes and the
// data in a single write, and the firmware checks the data's signature.
func writeEFIVar(v EFIVar) error {
	buf := binary.LittleEndian.AppendUint32(nil, v.Attrs)
	buf = append(buf, v.Data...)
	p := filepath.Join(efivarsDir, v.Name+"-"+v.GUID)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("enroll %s: %w", v.Name, err)
	}
	_, err = f.Write(buf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("enroll %s: the firmware refused it: %w", v.Name, err)
	}
	return nil
}
