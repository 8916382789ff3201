module github.com/stitchpatch/stitch

go 1.24
