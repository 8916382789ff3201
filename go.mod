module github.com/stitchpatch/stitch

go 1.26.0

require (
	golang.org/x/arch v0.32.0
	golang.org/x/sys v0.49.0
)

require github.com/ulikunitz/xz v0.5.15
