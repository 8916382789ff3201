package kallsyms

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/ulikunitz/xz/lzma"
)

// The kernel compresses its payload with xz --x86 --lzma2 (scripts/xz_wrap.sh),
// a filter chain the xz package's container reader refuses (it knows only
// LZMA2). So the container is read here, the LZMA2 data is decoded by
// github.com/ulikunitz/xz/lzma, and the x86 branch filter is undone by
// unBCJx86.

const (
	xzFilterX86   = 0x04
	xzFilterLZMA2 = 0x21

	maxDict   = 1 << 28
	maxOutput = 1 << 30 // no vmlinux is that big
)

// unxz decompresses a single-stream .xz file held in data.
func unxz(data []byte, sizeHint int) ([]byte, error) {
	if len(data) < 12 || !bytes.HasPrefix(data, []byte(xzMagic)) {
		return nil, fmt.Errorf("%w: no xz stream header", ErrFormat)
	}
	flags := data[6:8]
	if crc32.ChecksumIEEE(flags) != binary.LittleEndian.Uint32(data[8:12]) {
		return nil, fmt.Errorf("%w: xz stream header checksum", ErrFormat)
	}
	checkType := flags[1] & 0x0f
	checkLen := map[byte]int{0: 0, 1: 4, 4: 8, 10: 32}[checkType]
	if checkType != 0 && checkLen == 0 {
		return nil, fmt.Errorf("%w: xz check type %d", ErrUnsupported, checkType)
	}

	out := bytes.NewBuffer(make([]byte, 0, sizeHint))
	pos := 12
	for {
		if pos >= len(data) {
			return nil, fmt.Errorf("%w: xz stream truncated", ErrFormat)
		}
		if data[pos] == 0 { // the index follows the last block
			return out.Bytes(), nil
		}
		n, err := xzBlock(data[pos:], checkType, checkLen, out)
		if err != nil {
			return nil, fmt.Errorf("xz block at %#x: %w", pos, err)
		}
		pos += n
	}
}

// xzBlock decodes one block, appending to out; it returns the block's
// length in data, padding and check included.
func xzBlock(data []byte, checkType byte, checkLen int, out *bytes.Buffer) (int, error) {
	hdrLen := (int(data[0]) + 1) * 4
	if hdrLen > len(data) {
		return 0, fmt.Errorf("%w: block header truncated", ErrFormat)
	}
	hdr := data[:hdrLen]
	if crc32.ChecksumIEEE(hdr[:hdrLen-4]) != binary.LittleEndian.Uint32(hdr[hdrLen-4:]) {
		return 0, fmt.Errorf("%w: block header checksum", ErrFormat)
	}
	r := bytes.NewReader(hdr[2 : hdrLen-4])
	bflags := hdr[1]
	if bflags&0x40 != 0 { // compressed size: not needed, LZMA2 ends itself
		if _, err := binary.ReadUvarint(r); err != nil {
			return 0, fmt.Errorf("%w: block header: %v", ErrFormat, err)
		}
	}
	if bflags&0x80 != 0 {
		if _, err := binary.ReadUvarint(r); err != nil {
			return 0, fmt.Errorf("%w: block header: %v", ErrFormat, err)
		}
	}
	var x86 bool
	var dictProp byte
	nfilters := int(bflags&3) + 1
	for i := 0; i < nfilters; i++ {
		id, err1 := binary.ReadUvarint(r)
		plen, err2 := binary.ReadUvarint(r)
		if err := errors.Join(err1, err2); err != nil || plen > uint64(r.Len()) {
			return 0, fmt.Errorf("%w: block header filter flags", ErrFormat)
		}
		props := make([]byte, plen)
		_, _ = r.Read(props)
		last := i == nfilters-1
		switch {
		case id == xzFilterLZMA2 && last && plen == 1:
			dictProp = props[0]
		case id == xzFilterX86 && !last && (plen == 0 || plen == 4 && binary.LittleEndian.Uint32(props) == 0):
			x86 = true
		default:
			return 0, fmt.Errorf("%w: xz filter %#x (%d bytes of properties) at position %d of %d", ErrUnsupported, id, plen, i+1, nfilters)
		}
	}
	if dictProp > 40 {
		return 0, fmt.Errorf("%w: LZMA2 dictionary property %d", ErrFormat, dictProp)
	}
	// Kernels use 32 MiB; refusing more keeps hostile input from
	// allocating gigabytes.
	dict := uint64(2|dictProp&1) << (dictProp/2 + 11)
	if dictProp == 40 || dict > maxDict {
		return 0, fmt.Errorf("%w: LZMA2 dictionary of %d bytes (at most %d)", ErrUnsupported, dict, maxDict)
	}

	body := bytes.NewReader(data[hdrLen:])
	lr, err := lzma.Reader2Config{DictCap: int(dict)}.NewReader2(body)
	if err != nil {
		return 0, fmt.Errorf("%w: LZMA2: %v", ErrFormat, err)
	}
	start := out.Len()
	if n, err := io.CopyN(out, lr, maxOutput+1-int64(start)); err != nil && err != io.EOF {
		return 0, fmt.Errorf("%w: LZMA2: %v", ErrFormat, err)
	} else if err == nil {
		return 0, fmt.Errorf("%w: decompresses to more than %d bytes", ErrFormat, int64(start)+n)
	}
	block := out.Bytes()[start:]
	if x86 {
		unBCJx86(block)
	}

	// The LZMA2 reader reads byte by byte from a bytes.Reader, so the
	// reader's position is the end of the compressed data.
	n := hdrLen + int(body.Size()) - body.Len()
	n = (n + 3) &^ 3
	if n+checkLen > len(data) {
		return 0, fmt.Errorf("%w: block check truncated", ErrFormat)
	}
	if checkType == 1 && crc32.ChecksumIEEE(block) != binary.LittleEndian.Uint32(data[n:]) {
		return 0, fmt.Errorf("%w: xz block CRC32 mismatch", ErrFormat)
	}
	return n + checkLen, nil
}

// unBCJx86 undoes xz's x86 branch-call-jump filter in place. The encoder
// rewrote the rel32 operand of E8 (call) and E9 (jmp) opcodes whose top
// byte looked like a near displacement (00 or FF) into an absolute
// target, which compresses better; decoding subtracts the position again.
// A small history of recent E8/E9 bytes (mask) tells which candidates the
// encoder skipped because they were probably not instructions. The whole
// stream is in buf, so the position starts at 0 and no state carries over.
func unBCJx86(buf []byte) {
	near := func(b byte) bool { return b == 0 || b == 0xff }
	// Indexed by (mask>>1)&7: which histories allow a conversion, and which
	// byte of the operand to test again after a conversion.
	allowed := [8]bool{true, true, true, false, true, false, false, false}
	byteNum := [8]uint32{0, 1, 2, 2, 3, 3, 3, 3}

	var mask uint32
	prev := -5 // position of the last E8/E9 seen
	for i := 0; i+5 <= len(buf); {
		if buf[i] != 0xe8 && buf[i] != 0xe9 {
			i++
			continue
		}
		if d := i - prev; d > 5 {
			mask = 0
		} else {
			for k := 0; k < d; k++ {
				mask = (mask & 0x77) << 1
			}
		}
		prev = i
		top := buf[i+4]
		if !near(top) || !allowed[(mask>>1)&7] || mask>>1 >= 0x10 {
			i++
			mask |= 1
			if near(top) {
				mask |= 0x10
			}
			continue
		}
		src := binary.LittleEndian.Uint32(buf[i+1:])
		var dst uint32
		for {
			dst = src - uint32(i+5)
			if mask == 0 {
				break
			}
			shift := 24 - byteNum[mask>>1]*8
			if !near(byte(dst >> shift)) {
				break
			}
			src = dst ^ (1<<(shift+8) - 1)
		}
		// Sign-extend the 25-bit result to 32 bits.
		dst &= 0x01ffffff
		if dst&0x01000000 != 0 {
			dst |= 0xff000000
		}
		binary.LittleEndian.PutUint32(buf[i+1:], dst)
		i += 5
		mask = 0
	}
}
