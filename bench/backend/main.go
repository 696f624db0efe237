// Bare benchmark backend: plain HTTP/1.1 on loopback, stdlib only.
//
//	GET  /1k   1 KiB body
//	GET  /10m  10 MiB body
//	POST /up   reads and discards the whole request body, answers "ok"
//	GET  /slow 1 KiB body after 1 s (holds each connection of the handshake test busy)
//
// Usage: backend -addr 127.0.0.1:PORT
package main

import (
	"bytes"
	"flag"
	"io"
	"log"
	"net/http"
	"strconv"
	"time"
)

func body(n int) []byte {
	return bytes.Repeat([]byte("x"), n)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:18080", "listen address")
	flag.Parse()
	small := body(1024)
	big := body(10 * 1024 * 1024)
	serve := func(b []byte) http.HandlerFunc {
		n := strconv.Itoa(len(b))
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/octet-stream")
			w.Header().Set("Content-Length", n)
			w.Write(b)
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/1k", serve(small))
	mux.HandleFunc("/10m", serve(big))
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Second)
		serve(small)(w, r)
	})
	mux.HandleFunc("/up", func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("X-Received", strconv.FormatInt(n, 10))
		w.Write([]byte("ok"))
	})
	mux.HandleFunc("/_gwhealthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok"))
	})
	log.Fatal(http.ListenAndServe(*addr, mux))
}
