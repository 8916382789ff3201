// Package klpmod makes livepatch modules: from the functions a fix
// changed, it writes the object that carries them, generates the
// klp_patch registration, links the module with kbuild against the
// target's headers, and turns references to symbols the kernel does not
// export into klp relocations.
package klpmod
