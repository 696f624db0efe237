package main

/*
#include <stdint.h>
*/
import "C"

import (
	"encoding/binary"
	"errors"
	"net"
	"os"
	"strings"
	"time"

	"github.com/corazawaf/coraza/v3"
	"github.com/corazawaf/coraza/v3/types"
)

// The verdict channel: bodiless requests reach the engine without a foreign
// call. The proxy's event loop writes each request as one message to a
// SOCK_SEQPACKET socket whose other end this library reads on a goroutine (Go's
// own poller, every core); each verdict goes back as one message on the same
// socket, which the loop watches. No Python thread, no GIL hand-over and no
// call into Go sits between a request and its verdict.
//
// Request:  u64 id | u32 client port | u32 server port | client | server | uri |
//           method | protocol (each u32 length + bytes) | headers as startTx takes them.
// Verdict:  u64 id | i32 status to block with, 0, or -1 (engine failed) |
//           i64 engine nanoseconds | matches as qpc_tx_matches lists them.
// All integers little endian.

const (
	// RequestLimit is the largest request message; _coraza.py sends none larger.
	RequestLimit = 192 << 10
	// VerdictLimit bounds a verdict message; match lines beyond it are dropped.
	VerdictLimit = 60 << 10
	verdictHead  = 20
)

// qpc_pending counts goroutines still using rule set h (channel readers and
// evaluations, their logging phase included): it may be freed only at 0.
//
//export qpc_pending
func qpc_pending(h C.uintptr_t) C.int {
	return C.int(rules(h).pending.Load())
}

// qpc_channel_open serves verdicts of rule set h on the connected SOCK_SEQPACKET
// socket fd until its peer closes; the library owns fd from this call on.
// Returns 0, or -1 if fd is not such a socket.
//
//export qpc_channel_open
func qpc_channel_open(h C.uintptr_t, fd C.int) C.int {
	set := rules(h)
	f := os.NewFile(uintptr(fd), "waf-channel")
	conn, err := net.FileConn(f) // a duplicate, set non-blocking for the poller
	_ = f.Close()
	if err != nil {
		return -1
	}
	set.pending.Add(1)
	go serveChannel(set, conn)
	return 0
}

func serveChannel(set *ruleSet, conn net.Conn) {
	defer set.pending.Add(-1)
	defer conn.Close()
	buf := make([]byte, RequestLimit+1)
	for {
		n, err := conn.Read(buf)
		if err != nil || n == 0 {
			return // the proxy closed its end
		}
		msg := append([]byte(nil), buf[:n]...)
		set.pending.Add(1)
		go func() {
			defer set.pending.Add(-1)
			answer(set.WAF, conn, msg)
		}()
	}
}

var errShort = errors.New("short message")

// field splits a u32-length-prefixed string off data.
func field(data []byte) (string, []byte, error) {
	if len(data) < 4 {
		return "", nil, errShort
	}
	size := int(binary.LittleEndian.Uint32(data))
	if size > len(data)-4 {
		return "", nil, errShort
	}
	return string(data[4 : 4+size]), data[4+size:], nil
}

func parseRequest(msg []byte) (r request, err error) {
	if len(msg) < 16 || len(msg) > RequestLimit {
		return r, errShort
	}
	r.clientPort = int(binary.LittleEndian.Uint32(msg[8:]))
	r.serverPort = int(binary.LittleEndian.Uint32(msg[12:]))
	rest := msg[16:]
	for _, s := range []*string{&r.client, &r.server, &r.uri, &r.method, &r.protocol} {
		if *s, rest, err = field(rest); err != nil {
			return r, err
		}
	}
	r.headers = rest
	return r, nil
}

// answer evaluates one request message and writes its verdict; then, with
// nobody waiting, runs the logging phase and frees the transaction.
func answer(waf coraza.WAF, conn net.Conn, msg []byte) {
	if len(msg) < 8 {
		return // no id to answer to; the proxy never sends this
	}
	id := binary.LittleEndian.Uint64(msg)
	blocked, matches, nanos := C.int(-1), "", int64(0)
	var t types.Transaction
	if r, err := parseRequest(msg); err == nil {
		t, blocked, matches, nanos = run(waf, r)
	}
	out := make([]byte, verdictHead, verdictHead+len(matches))
	binary.LittleEndian.PutUint64(out, id)
	binary.LittleEndian.PutUint32(out[8:], uint32(int32(blocked)))
	binary.LittleEndian.PutUint64(out[12:], uint64(nanos))
	out = append(out, truncateLines(matches, VerdictLimit-verdictHead)...)
	_, _ = conn.Write(out) // fails only once the proxy has closed its end
	if t != nil {
		defer func() { _ = recover() }()
		t.ProcessLogging()
		_ = t.Close()
	}
}

// run evaluates every request phase; a panic in any of them yields -1.
func run(waf coraza.WAF, r request) (t types.Transaction, blocked C.int, matches string, nanos int64) {
	start := time.Now()
	defer func() {
		if recover() != nil {
			blocked = -1
		}
		nanos = time.Since(start).Nanoseconds()
	}()
	t = newTx(waf, r)
	blocked, matches = evaluate(t, nil)
	return t, blocked, matches, 0
}

// truncateLines keeps whole lines of text within limit bytes.
func truncateLines(text string, limit int) string {
	if len(text) <= limit {
		return text
	}
	return text[:strings.LastIndexByte(text[:limit], '\n')+1]
}
