package kallsyms

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/klauspost/compress/zstd"
)

const (
	xzMagic   = "\xfd7zXZ\x00"
	zstdMagic = "\x28\xb5\x2f\xfd"
	elfMagic  = "\x7fELF"
)

// Compression magics of the other payload formats the kernel can build
// (CONFIG_KERNEL_*), so an unsupported image is named, not just refused.
var otherCompressions = []struct{ magic, name string }{
	{"BZh", "bzip2"},
	{"\x5d\x00\x00", "lzma"},
	{"\x89LZO", "lzo"},
	{"\x02\x21\x4c\x18", "lz4"},
}

// ExtractVmlinux returns the vmlinux ELF file inside a bzImage boot image.
//
// The x86 boot protocol (Documentation/x86/boot.rst) puts a setup header
// at 0x1f1: setup_sects says how many 512-byte sectors of real-mode code
// precede the protected-mode kernel, and (protocol 2.08+) payload_offset
// and payload_length locate the compressed vmlinux inside it. The
// payload's last 4 bytes are the decompressed size (kbuild's size_append).
func ExtractVmlinux(image []byte) (vmlinux []byte, err error) {
	defer recoverInto(&err)
	if len(image) < 0x250 || string(image[0x202:0x206]) != "HdrS" {
		return nil, fmt.Errorf("%w: no x86 boot setup header (HdrS)", ErrFormat)
	}
	if v := binary.LittleEndian.Uint16(image[0x206:]); v < 0x208 {
		return nil, fmt.Errorf("%w: boot protocol %#x has no payload fields (2.08+ needed)", ErrUnsupported, v)
	}
	setupSects := int(image[0x1f1])
	if setupSects == 0 {
		setupSects = 4 // as the boot protocol says for old images
	}
	off := uint64(setupSects+1)*512 + uint64(binary.LittleEndian.Uint32(image[0x248:]))
	n := uint64(binary.LittleEndian.Uint32(image[0x24c:]))
	if n < 4 || off+n > uint64(len(image)) {
		return nil, fmt.Errorf("%w: payload [%#x, +%#x) outside the %d-byte image", ErrFormat, off, n, len(image))
	}
	payload := image[off : off+n]
	// Only a hint for the output buffer: a corrupt one must not allocate
	// a gigabyte, and kernels compress by less than 32 times.
	size := min(int(binary.LittleEndian.Uint32(payload[n-4:])), 32*int(n))
	payload = payload[:n-4]

	var out []byte
	switch {
	case bytes.HasPrefix(payload, []byte(xzMagic)):
		out, err = unxz(payload, size)
	case bytes.HasPrefix(payload, []byte(zstdMagic)):
		out, err = unzstd(payload, size) // 6.12's Debian images
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		out, err = gunzip(payload, size)
	case bytes.HasPrefix(payload, []byte(elfMagic)):
		out = payload // CONFIG_KERNEL_UNCOMPRESSED
	default:
		for _, c := range otherCompressions {
			if bytes.HasPrefix(payload, []byte(c.magic)) {
				return nil, fmt.Errorf("%w: %s-compressed kernel payload (only xz, zstd and gzip are read)", ErrUnsupported, c.name)
			}
		}
		return nil, fmt.Errorf("%w: unknown kernel payload compression (magic % x)", ErrFormat, payload[:min(len(payload), 6)])
	}
	if err != nil {
		return nil, fmt.Errorf("decompress kernel payload: %w", err)
	}
	if !bytes.HasPrefix(out, []byte(elfMagic)) {
		return nil, fmt.Errorf("%w: the decompressed payload is not an ELF file", ErrFormat)
	}
	return out, nil
}

// unzstd decompresses a zstd frame. The kernel's zstd payload is made
// with a window as large as the image (zstd --ultra -22), so the decoder
// gets a window limit to match rather than its 8 MiB default.
func unzstd(data []byte, size int) ([]byte, error) {
	zr, err := zstd.NewReader(bytes.NewReader(data), zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxWindow(1<<31), zstd.WithDecoderMaxMemory(uint64(32*len(data))+1<<20))
	if err != nil {
		return nil, err
	}
	defer zr.Close()
	out := bytes.NewBuffer(make([]byte, 0, size))
	if _, err := io.Copy(out, zr); err != nil {
		return nil, fmt.Errorf("%w: zstd: %v", ErrFormat, err)
	}
	return out.Bytes(), nil
}

func gunzip(data []byte, size int) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	zr.Multistream(false)
	out := bytes.NewBuffer(make([]byte, 0, size))
	if _, err := io.Copy(out, zr); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// CachedVmlinux returns the path of the vmlinux extracted from the boot
// image at imagePath, extracting it on first use. The copy lives in
// cacheDir/vmlinux, named by the image's sha256, so a rebuilt image with
// the same name never reuses a stale copy; it is written to a temporary
// file and renamed, so a crash never leaves a half-written one.
func CachedVmlinux(ctx context.Context, imagePath, cacheDir string, log *slog.Logger) (string, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	image, err := os.ReadFile(imagePath)
	if err != nil {
		return "", fmt.Errorf("read kernel image: %w", err)
	}
	sum := sha256.Sum256(image)
	dir := filepath.Join(cacheDir, "vmlinux")
	path := filepath.Join(dir, hex.EncodeToString(sum[:])+".elf")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	log.Info("extracting vmlinux", "image", imagePath, "cache", path)
	vmlinux, err := ExtractVmlinux(image)
	if err != nil {
		return "", fmt.Errorf("extract vmlinux from %s: %w", imagePath, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("vmlinux cache: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".vmlinux-*")
	if err != nil {
		return "", fmt.Errorf("vmlinux cache: %w", err)
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if _, err := tmp.Write(vmlinux); err != nil {
		tmp.Close()
		return "", fmt.Errorf("vmlinux cache: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("vmlinux cache: %w", err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return "", fmt.Errorf("vmlinux cache: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", fmt.Errorf("vmlinux cache: %w", err)
	}
	return path, nil
}
