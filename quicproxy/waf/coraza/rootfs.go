package main

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	coreruleset "github.com/corazawaf/coraza-coreruleset/v4"
)

// rootFS resolves rule and data file names for the parser: names with an
// "@" element (@owasp_crs/..., @crs-setup.conf.example) come from the CRS
// compiled into this library, everything else from the local disk.
type rootFS struct{}

func embedded(name string) bool {
	return strings.HasPrefix(name, "@") || strings.Contains(name, "/@")
}

func (rootFS) Open(name string) (fs.File, error) {
	if embedded(name) {
		return coreruleset.FS.Open(name[strings.Index(name, "@"):])
	}
	return os.Open(name)
}

func (rootFS) ReadFile(name string) ([]byte, error) {
	if embedded(name) {
		return fs.ReadFile(coreruleset.FS, name[strings.Index(name, "@"):])
	}
	return os.ReadFile(name)
}

func (rootFS) Glob(pattern string) ([]string, error) {
	if embedded(pattern) {
		return fs.Glob(coreruleset.FS, pattern[strings.Index(pattern, "@"):])
	}
	return filepath.Glob(pattern)
}
