// Strict backend for tests/test_strict_backends.py: Go net/http.
// Answers every request with JSON: method, body length, sha256 of the body, and the
// framing fields as received (Go folds Transfer-Encoding into the request, so it is
// reported from there), and the names of all fields. /status/NNN answers NNN with a
// Content-Length of 5 and "hello" (which net/http leaves out where the status has no body).
// Prints the port it listens on, then serves until killed.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
)

func handle(w http.ResponseWriter, r *http.Request) {
	hash := sha256.New()
	length, err := io.Copy(hash, r.Body)
	if err != nil {
		http.Error(w, "body: "+err.Error(), http.StatusBadRequest)
		return
	}
	if strings.HasPrefix(r.URL.Path, "/status/") {
		code, _ := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/status/"))
		w.Header().Set("Content-Length", "5")
		w.WriteHeader(code)
		if r.Method != http.MethodHead {
			w.Write([]byte("hello"))
		}
		return
	}
	framing := [][2]string{}
	for _, v := range r.Header.Values("Content-Length") {
		framing = append(framing, [2]string{"content-length", v})
	}
	for _, v := range r.TransferEncoding {
		framing = append(framing, [2]string{"transfer-encoding", v})
	}
	names := []string{}
	for name := range r.Header {
		names = append(names, strings.ToLower(name))
	}
	body, _ := json.Marshal(map[string]any{
		"names":   names,
		"method":  r.Method,
		"length":  length,
		"sha256":  hex.EncodeToString(hash.Sum(nil)),
		"framing": framing,
	})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	if r.Method != http.MethodHead {
		w.Write(body)
	}
}

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("%d\n", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	http.Serve(ln, http.HandlerFunc(handle))
}
