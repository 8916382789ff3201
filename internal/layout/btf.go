package layout

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// ErrBadBTF means BTF data is malformed: truncated, out of bounds, of an
// unknown kind, or with type references that loop.
var ErrBadBTF = errors.New("malformed BTF")

// errNoType means a struct or union of that name is not in the BTF.
var errNoType = errors.New("no such type")

// BTF kinds (include/uapi/linux/btf.h).
const (
	kindInt       = 1
	kindPtr       = 2
	kindArray     = 3
	kindStruct    = 4
	kindUnion     = 5
	kindEnum      = 6
	kindFwd       = 7
	kindTypedef   = 8
	kindVolatile  = 9
	kindConst     = 10
	kindRestrict  = 11
	kindFunc      = 12
	kindFuncProto = 13
	kindVar       = 14
	kindDatasec   = 15
	kindFloat     = 16
	kindDeclTag   = 17
	kindTypeTag   = 18
	kindEnum64    = 19
)

const (
	btfMagic     = 0xeb9f
	btfHeaderLen = 24
	btfTypeLen   = 12 // struct btf_type: name_off, info, size/type
	// pointerSize: BTF does not record it; the layouts are x86-64's.
	pointerSize = 8
	// maxHops bounds a chain of typedefs and qualifiers, and the nesting
	// of anonymous members: real kernels need a handful, and a loop in
	// corrupt data must end in an error.
	maxHops = 64
	// maxMembers bounds the members of one struct, anonymous ones
	// flattened: a struct that names itself as an anonymous member many
	// times over must not take forever either.
	maxMembers = 1 << 16
)

// BTF is parsed BTF type information (Documentation/bpf/btf.rst): the
// types of a kernel image's .BTF section, enough to tell the size of a
// struct and where its members are.
type BTF struct {
	order binary.ByteOrder
	types []btfType // type id i+1; id 0 is void
	data  []byte    // the type section, for the kinds' trailing data
	strs  []byte
}

type btfType struct {
	name     uint32
	info     uint32
	sizeType uint32 // size, or the referenced type's id
	extra    int    // offset of the trailing data in BTF.data
}

func (t btfType) kind() int   { return int(t.info>>24) & 0x1f }
func (t btfType) vlen() int   { return int(t.info & 0xffff) }
func (t btfType) kflag() bool { return t.info>>31 == 1 }

// ParseBTF reads BTF data (a vmlinux's .BTF section). The byte order is
// the one the magic number is written in. Every offset is checked: bad
// data gives an error wrapping ErrBadBTF, never a panic.
func ParseBTF(data []byte) (*BTF, error) {
	if len(data) < btfHeaderLen {
		return nil, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrBadBTF, len(data), btfHeaderLen)
	}
	b := &BTF{}
	switch {
	case binary.LittleEndian.Uint16(data) == btfMagic:
		b.order = binary.LittleEndian
	case binary.BigEndian.Uint16(data) == btfMagic:
		b.order = binary.BigEndian
	default:
		return nil, fmt.Errorf("%w: bad magic % x", ErrBadBTF, data[:2])
	}
	if v := data[2]; v != 1 {
		return nil, fmt.Errorf("%w: version %d (only 1 is defined)", ErrBadBTF, v)
	}
	u32 := func(off int) uint64 { return uint64(b.order.Uint32(data[off:])) }
	hdrLen := u32(4)
	if hdrLen < btfHeaderLen || hdrLen > uint64(len(data)) {
		return nil, fmt.Errorf("%w: header length %d in %d bytes", ErrBadBTF, hdrLen, len(data))
	}
	body := data[hdrLen:]
	typeOff, typeLen, strOff, strLen := u32(8), u32(12), u32(16), u32(20)
	if typeOff+typeLen > uint64(len(body)) || strOff+strLen > uint64(len(body)) {
		return nil, fmt.Errorf("%w: type section [%d,+%d) or string section [%d,+%d) outside the %d bytes after the header",
			ErrBadBTF, typeOff, typeLen, strOff, strLen, len(body))
	}
	b.data = body[typeOff : typeOff+typeLen]
	b.strs = body[strOff : strOff+strLen]
	if len(b.strs) > 0 && b.strs[0] != 0 {
		return nil, fmt.Errorf("%w: the string section does not start with the empty string", ErrBadBTF)
	}
	for off := 0; off < len(b.data); {
		if len(b.data)-off < btfTypeLen {
			return nil, fmt.Errorf("%w: type %d truncated at offset %d", ErrBadBTF, len(b.types)+1, off)
		}
		t := btfType{name: b.order.Uint32(b.data[off:]), info: b.order.Uint32(b.data[off+4:]), sizeType: b.order.Uint32(b.data[off+8:]), extra: off + btfTypeLen}
		n, err := trailing(t)
		if err != nil {
			return nil, fmt.Errorf("%w: type %d at offset %d: %v", ErrBadBTF, len(b.types)+1, off, err)
		}
		if n > len(b.data)-t.extra {
			return nil, fmt.Errorf("%w: type %d at offset %d: its %d bytes of %s data run past the type section", ErrBadBTF, len(b.types)+1, off, n, kindName(t.kind()))
		}
		b.types = append(b.types, t)
		off = t.extra + n
	}
	return b, nil
}

// trailing is the size of the data that follows a type's common part.
func trailing(t btfType) (int, error) {
	switch t.kind() {
	case kindInt, kindVar, kindDeclTag:
		return 4, nil // encoding; linkage; component index
	case kindPtr, kindFwd, kindTypedef, kindVolatile, kindConst, kindRestrict, kindFunc, kindFloat, kindTypeTag:
		return 0, nil
	case kindArray:
		return 12, nil // element type, index type, count
	case kindStruct, kindUnion, kindDatasec, kindEnum64:
		return 12 * t.vlen(), nil // members; variables; name and value halves
	case kindEnum, kindFuncProto:
		return 8 * t.vlen(), nil // name and value; name and type
	}
	return 0, fmt.Errorf("unknown kind %d", t.kind())
}

func kindName(k int) string {
	names := [...]string{"void", "int", "pointer", "array", "struct", "union", "enum", "forward declaration", "typedef",
		"volatile", "const", "restrict", "func", "func proto", "var", "datasec", "float", "decl tag", "type tag", "enum64"}
	if k >= 0 && k < len(names) {
		return names[k]
	}
	return fmt.Sprintf("kind %d", k)
}

// NumTypes is the number of types, void not counted.
func (b *BTF) NumTypes() int { return len(b.types) }

func (b *BTF) typ(id uint32) (btfType, error) {
	if id == 0 || uint64(id) > uint64(len(b.types)) {
		return btfType{}, fmt.Errorf("%w: type id %d out of range (1..%d)", ErrBadBTF, id, len(b.types))
	}
	return b.types[id-1], nil
}

func (b *BTF) str(off uint32) (string, error) {
	if uint64(off) >= uint64(len(b.strs)) {
		if off == 0 {
			return "", nil // no string section: every name is empty
		}
		return "", fmt.Errorf("%w: string offset %d outside the %d-byte string section", ErrBadBTF, off, len(b.strs))
	}
	for i := int(off); i < len(b.strs); i++ {
		if b.strs[i] == 0 {
			return string(b.strs[off:i]), nil
		}
	}
	return "", fmt.Errorf("%w: string at offset %d is not terminated", ErrBadBTF, off)
}

// resolve follows typedefs and qualifiers to the type they name.
func (b *BTF) resolve(id uint32) (btfType, error) {
	for range maxHops {
		t, err := b.typ(id)
		if err != nil {
			return t, err
		}
		switch t.kind() {
		case kindTypedef, kindVolatile, kindConst, kindRestrict, kindTypeTag:
			id = t.sizeType
			continue
		}
		return t, nil
	}
	return btfType{}, fmt.Errorf("%w: type %d: more than %d typedefs and qualifiers (a loop?)", ErrBadBTF, id, maxHops)
}

// SizeOf is the size in bytes of the type with the given id.
func (b *BTF) SizeOf(id uint32) (uint64, error) {
	return b.sizeOf(id, 0)
}

func (b *BTF) sizeOf(id uint32, depth int) (uint64, error) {
	if depth > maxHops {
		return 0, fmt.Errorf("%w: type %d: arrays nested more than %d deep (a loop?)", ErrBadBTF, id, maxHops)
	}
	t, err := b.resolve(id)
	if err != nil {
		return 0, err
	}
	switch t.kind() {
	case kindInt, kindEnum, kindEnum64, kindStruct, kindUnion, kindFloat, kindDatasec:
		return uint64(t.sizeType), nil
	case kindPtr:
		return pointerSize, nil
	case kindArray:
		elem := b.order.Uint32(b.data[t.extra:])
		n := uint64(b.order.Uint32(b.data[t.extra+8:]))
		es, err := b.sizeOf(elem, depth+1)
		if err != nil {
			return 0, err
		}
		if n != 0 && es > (1<<40)/n {
			return 0, fmt.Errorf("%w: array of %d elements of %d bytes", ErrBadBTF, n, es)
		}
		return es * n, nil
	}
	return 0, fmt.Errorf("%w: a %s has no size", ErrBadBTF, kindName(t.kind()))
}

// Struct is a struct or union: its size and its members, with the
// members of anonymous struct and union members among them (at their
// offsets in this one), as C lets code name them.
type Struct struct {
	Name    string
	Union   bool
	Size    uint64
	Members []Member
}

// Member is a member of a struct or union.
type Member struct {
	Name      string
	BitOffset uint64 // from the start of the outermost struct
	BitSize   uint32 // of a bitfield; 0 for an ordinary member
	Type      uint32 // BTF type id
}

// Member returns the member called name.
func (s *Struct) Member(name string) (Member, bool) {
	for _, m := range s.Members {
		if m.Name == name {
			return m, true
		}
	}
	return Member{}, false
}

// Struct returns the struct or union called name. When the BTF has more
// than one of that name (types deduplication could not merge), they must
// agree, or which one an entry follows cannot be told.
func (b *BTF) Struct(name string) (*Struct, error) {
	var found *Struct
	for i, t := range b.types {
		if t.kind() != kindStruct && t.kind() != kindUnion {
			continue
		}
		n, err := b.str(t.name)
		if err != nil {
			return nil, err
		}
		if n != name {
			continue
		}
		s, err := b.structAt(uint32(i + 1))
		if err != nil {
			return nil, fmt.Errorf("struct %s: %w", name, err)
		}
		if found != nil && !sameStruct(found, s) {
			return nil, fmt.Errorf("%w: two different definitions of struct %s (%d and %d bytes)", ErrBadBTF, name, found.Size, s.Size)
		}
		found = s
	}
	if found == nil {
		return nil, fmt.Errorf("%w: struct %s", errNoType, name)
	}
	return found, nil
}

func sameStruct(a, b *Struct) bool {
	if a.Size != b.Size || len(a.Members) != len(b.Members) {
		return false
	}
	for i := range a.Members {
		x, y := a.Members[i], b.Members[i]
		if x.Name != y.Name || x.BitOffset != y.BitOffset || x.BitSize != y.BitSize {
			return false
		}
	}
	return true
}

func (b *BTF) structAt(id uint32) (*Struct, error) {
	t, err := b.typ(id)
	if err != nil {
		return nil, err
	}
	name, err := b.str(t.name)
	if err != nil {
		return nil, err
	}
	s := &Struct{Name: name, Union: t.kind() == kindUnion, Size: uint64(t.sizeType)}
	budget := maxMembers
	if err := b.members(s, t, 0, 0, &budget); err != nil {
		return nil, err
	}
	return s, nil
}

// members appends the members of t, a struct or union at bit offset base
// of s, flattening anonymous struct and union members.
func (b *BTF) members(s *Struct, t btfType, base uint64, depth int, budget *int) error {
	if depth > maxHops {
		return fmt.Errorf("%w: anonymous members nested more than %d deep (a loop?)", ErrBadBTF, maxHops)
	}
	for i := range t.vlen() {
		if *budget--; *budget < 0 {
			return fmt.Errorf("%w: more than %d members, anonymous ones counted in full (a loop?)", ErrBadBTF, maxMembers)
		}
		p := t.extra + 12*i
		nameOff, typ, off := b.order.Uint32(b.data[p:]), b.order.Uint32(b.data[p+4:]), b.order.Uint32(b.data[p+8:])
		name, err := b.str(nameOff)
		if err != nil {
			return err
		}
		m := Member{Name: name, BitOffset: base + uint64(off), Type: typ}
		if t.kflag() {
			// kind_flag: the offset word holds the bitfield's size above
			// its 24-bit offset.
			m.BitOffset, m.BitSize = base+uint64(off&0xffffff), off>>24
		}
		if name == "" {
			if inner, err := b.resolve(typ); err == nil && (inner.kind() == kindStruct || inner.kind() == kindUnion) {
				if err := b.members(s, inner, m.BitOffset, depth+1, budget); err != nil {
					return err
				}
				continue
			}
		}
		s.Members = append(s.Members, m)
	}
	return nil
}

// Field is the place of a whole-byte member: what a reader of an entry
// can take at an offset.
type Field struct {
	Offset int `json:"offset"`
	Size   int `json:"size"`
}

// Field returns member name of s as a byte range; a bitfield, or a
// member whose size cannot be told, is an error.
func (b *BTF) Field(s *Struct, name string) (Field, error) {
	m, ok := s.Member(name)
	if !ok {
		return Field{}, fmt.Errorf("struct %s has no member %s", s.Name, name)
	}
	size, err := b.SizeOf(m.Type)
	if err != nil {
		return Field{}, fmt.Errorf("%s.%s: %w", s.Name, name, err)
	}
	bits := m.BitSize
	if t, err := b.resolve(m.Type); err == nil && t.kind() == kindInt && bits == 0 {
		// Without kind_flag, an int member's bitfield lives in the int's
		// encoding: offset in bits 16-23, width in bits 0-7.
		enc := b.order.Uint32(b.data[t.extra:])
		if off, n := uint64(enc>>16&0xff), enc&0xff; off != 0 || uint64(n) != 8*size {
			m.BitOffset += off
			bits = n
		}
	}
	if bits != 0 || m.BitOffset%8 != 0 {
		return Field{}, fmt.Errorf("%s.%s is a bitfield (%d bits at bit %d), not a whole-byte member", s.Name, name, bits, m.BitOffset)
	}
	off := m.BitOffset / 8
	if off+size > s.Size || size > 1<<20 {
		return Field{}, fmt.Errorf("%w: %s.%s (%d bytes at %d) lies outside the %d-byte struct", ErrBadBTF, s.Name, name, size, off, s.Size)
	}
	return Field{Offset: int(off), Size: int(size)}, nil
}
