// Bare benchmark backend: plain HTTP/1.1 on loopback, stdlib only.
//
//	GET  /1k   1 KiB body
//	GET  /10m  10 MiB body
//	POST /up   reads and discards the whole request body, answers "ok"
//	GET  /slow 1 KiB body after 1 s (holds each connection of the handshake test busy)
//	GET  /ws   WebSocket echo (RFC 6455, stdlib only): every message sent back as it came
//	GET  /fo/  1 KiB body (the failover row: three of these behind one route, one killed)
//	POST /bench.Echo/Unary  gRPC unary echo over h2c (stdlib HTTP/2 without TLS): the
//	           length-prefixed message back, grpc-status 0 in the trailers
//
// Usage: backend -addr 127.0.0.1:PORT
package main

import (
	"bufio"
	"bytes"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"flag"
	"io"
	"log"
	"net/http"
	"strconv"
	"strings"
	"time"
)

const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// wsEcho answers the WebSocket handshake, then echoes every frame back (unmasked), a close
// frame included (then it closes). Messages stay whole: frames are echoed one by one.
func wsEcho(w http.ResponseWriter, r *http.Request) {
	key := r.Header.Get("Sec-WebSocket-Key")
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") || key == "" {
		http.Error(w, "not a WebSocket handshake", http.StatusBadRequest)
		return
	}
	conn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	sum := sha1.Sum([]byte(key + wsGUID))
	rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Accept: " + base64.StdEncoding.EncodeToString(sum[:]) + "\r\n\r\n")
	if rw.Flush() != nil {
		return
	}
	echoFrames(rw.Reader, rw.Writer)
}

// grpcEcho answers a gRPC unary call: the request's one length-prefixed message is sent
// back as the response message, then grpc-status 0 as a trailer.
func grpcEcho(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor != 2 || !strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
		http.Error(w, "gRPC over HTTP/2 only", http.StatusBadRequest)
		return
	}
	msg, err := io.ReadAll(io.LimitReader(r.Body, 4<<20))
	if err != nil || len(msg) < 5 {
		http.Error(w, "bad gRPC message", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/grpc")
	w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
	w.WriteHeader(http.StatusOK)
	w.Write(msg)
	w.Header().Set("Grpc-Status", "0")
	w.Header().Set("Grpc-Message", "")
}

func echoFrames(in *bufio.Reader, out *bufio.Writer) {
	head := make([]byte, 14)
	for {
		if _, err := io.ReadFull(in, head[:2]); err != nil {
			return
		}
		fin, op, masked := head[0]&0x80, head[0]&0x0f, head[1]&0x80 != 0
		n := uint64(head[1] & 0x7f)
		switch n {
		case 126:
			if _, err := io.ReadFull(in, head[2:4]); err != nil {
				return
			}
			n = uint64(binary.BigEndian.Uint16(head[2:4]))
		case 127:
			if _, err := io.ReadFull(in, head[2:10]); err != nil {
				return
			}
			n = binary.BigEndian.Uint64(head[2:10])
		}
		var mask [4]byte
		if masked {
			if _, err := io.ReadFull(in, mask[:]); err != nil {
				return
			}
		}
		if n > 64<<20 {
			return
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(in, payload); err != nil {
			return
		}
		for i := range payload {
			payload[i] ^= mask[i%4]
		}
		reply := []byte{fin | op}
		switch {
		case n < 126:
			reply = append(reply, byte(n))
		case n < 1<<16:
			reply = append(reply, 126, byte(n>>8), byte(n))
		default:
			reply = append(reply, 127)
			reply = binary.BigEndian.AppendUint64(reply, n)
		}
		if op == 0x9 { // ping: pong
			reply[0] = fin | 0xA
		}
		out.Write(reply)
		out.Write(payload)
		if out.Flush() != nil || op == 0x8 {
			return
		}
	}
}

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
	mux.HandleFunc("/fo/", serve(small))
	mux.HandleFunc("/ws", wsEcho)
	mux.HandleFunc("/_gwhealthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok"))
	})
	mux.HandleFunc("/bench.Echo/Unary", grpcEcho)
	srv := &http.Server{Addr: *addr, Handler: mux, Protocols: new(http.Protocols)}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true) // h2c with prior knowledge: the gRPC row
	log.Fatal(srv.ListenAndServe())
}
