// The WAF peer of the bench: a small Go reverse proxy with Coraza's own HTTP middleware
// (github.com/corazawaf/coraza/v3/http) in front of net/http/httputil, serving HTTP/1.1 and
// HTTP/2 over TLS (net/http) and HTTP/3 (quic-go's http3) on one port, with the CRS 4 that
// coraza-coreruleset compiles in. The rule set is the one quicproxy's Coraza engine loads,
// given as a file of directives (bench/targets.py writes it with quicproxy's own
// coraza_directives), so both run the same CRS at the same paranoia level.
//
// Usage: wafpeer -addr 127.0.0.1:PORT -backend http://127.0.0.1:PORT -cert C -key K -directives FILE
package main

import (
	"flag"
	"io/fs"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	coreruleset "github.com/corazawaf/coraza-coreruleset/v4"
	"github.com/corazawaf/coraza/v3"
	txhttp "github.com/corazawaf/coraza/v3/http"
	"github.com/quic-go/quic-go/http3"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8443", "TLS TCP and QUIC UDP address")
	backend := flag.String("backend", "", "backend URL")
	cert := flag.String("cert", "", "certificate PEM")
	key := flag.String("key", "", "key PEM")
	directives := flag.String("directives", "", "file of Coraza directives")
	flag.Parse()
	rules, err := os.ReadFile(*directives)
	if err != nil {
		log.Fatal(err)
	}
	waf, err := coraza.NewWAF(coraza.NewWAFConfig().WithRootFS(rootFS{}).WithDirectives(string(rules)))
	if err != nil {
		log.Fatal(err)
	}
	target, err := url.Parse(*backend)
	if err != nil {
		log.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = &http.Transport{MaxIdleConnsPerHost: 1024, ForceAttemptHTTP2: false}
	mux := http.NewServeMux()
	mux.HandleFunc("/_gwhealthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("OK\n")) })
	mux.Handle("/", txhttp.WrapHandler(waf, proxy))
	h3 := &http3.Server{Addr: *addr, Handler: mux}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h3.SetQUICHeaders(w.Header()) // Alt-Svc, as a browser-facing edge sends it
		mux.ServeHTTP(w, r)
	})
	go func() { log.Fatal(h3.ListenAndServeTLS(*cert, *key)) }()
	log.Fatal((&http.Server{Addr: *addr, Handler: handler}).ListenAndServeTLS(*cert, *key))
}

// rootFS: names with an "@" element (@owasp_crs/..., @crs-setup.conf.example) from the CRS
// compiled in, the rest (quicproxy's own rule files) from the disk.
type rootFS struct{}

func crs(name string) (string, bool) {
	if i := strings.Index(name, "@"); i == 0 || strings.Contains(name, "/@") {
		return name[i:], true
	}
	return name, false
}

func (rootFS) Open(name string) (fs.File, error) {
	if n, ok := crs(name); ok {
		return coreruleset.FS.Open(n)
	}
	return os.Open(name)
}

func (rootFS) ReadFile(name string) ([]byte, error) {
	if n, ok := crs(name); ok {
		return fs.ReadFile(coreruleset.FS, n)
	}
	return os.ReadFile(name)
}

func (rootFS) Glob(pattern string) ([]string, error) {
	if n, ok := crs(pattern); ok {
		return fs.Glob(coreruleset.FS, n)
	}
	return filepath.Glob(pattern)
}
