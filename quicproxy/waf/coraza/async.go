package main

/*
#include <stdint.h>
*/
import "C"

import (
	"encoding/binary"
	"runtime/cgo"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/corazawaf/coraza/v3"
	"github.com/corazawaf/coraza/v3/types"
)

// Asynchronous evaluation: the caller (the proxy's event loop) hands a request
// over and returns at once; a goroutine evaluates it on Go's own threads (every
// core, no Python thread, no GIL hand-over) and writes the transaction handle,
// 8 bytes little endian, to a pipe the loop watches. The loop then reads the
// verdict with qpc_async_result and forgets the handle with qpc_async_close; the
// goroutine runs the logging phase and frees the transaction once the verdict is
// out, so nobody waits for it.

// async is a transaction evaluated on a goroutine; its fields are written by the
// goroutine before it writes the handle to the pipe, and read after the caller
// has read it.
type async struct {
	blocked C.int
	matches string
	nanos   int64 // time the evaluation took on its goroutine
}

var pending atomic.Int64

// qpc_async_pending counts goroutines still using a rule set (evaluating or
// logging): the rule set may be freed only at 0.
//
//export qpc_async_pending
func qpc_async_pending() C.int {
	return C.int(pending.Load())
}

// qpc_async_eval copies the request, starts its evaluation (every request phase,
// the body if bodyLen > 0) and returns the handle that will be written to fd.
//
//export qpc_async_eval
func qpc_async_eval(
	h C.uintptr_t,
	client *C.char, clientPort C.int, server *C.char, serverPort C.int,
	uri *C.char, method *C.char, protocol *C.char,
	headers *C.char, headersLen C.int, body *C.char, bodyLen C.int, fd C.int,
) C.uintptr_t {
	waf := cgo.Handle(h).Value().(coraza.WAF)
	r := copyRequest(client, clientPort, server, serverPort, uri, method, protocol, headers, headersLen)
	data := C.GoBytes(unsafe.Pointer(body), bodyLen)
	a := &async{}
	handle := cgo.NewHandle(a)
	pending.Add(1)
	go func() {
		defer pending.Add(-1)
		t := a.run(waf, r, data)
		notify(int(fd), uint64(handle))
		// The verdict is out: the logging phase and the release keep nobody waiting.
		defer func() { _ = recover() }()
		if t != nil {
			t.ProcessLogging()
			_ = t.Close()
		}
	}()
	return C.uintptr_t(handle)
}

// run evaluates the request into a's fields and returns the transaction (nil if
// opening it failed); a panic in any phase yields -1.
func (a *async) run(waf coraza.WAF, r request, data []byte) (t types.Transaction) {
	start := time.Now()
	defer func() {
		if recover() != nil {
			a.blocked = -1
		}
		a.nanos = time.Since(start).Nanoseconds()
	}()
	t = newTx(waf, r)
	a.blocked, a.matches = evaluate(t, data)
	return t
}

func notify(fd int, handle uint64) {
	var buf [8]byte
	binary.LittleEndian.PutUint64(buf[:], handle)
	for {
		if _, err := syscall.Write(fd, buf[:]); err != syscall.EINTR {
			return
		}
	}
}

// qpc_async_result is the verdict of a finished evaluation: the status to block
// with, 0, or -1 when the engine failed; *matches receives the logged matches as
// qpc_tx_matches returns them (free with qpc_free); *nanos the time the
// evaluation took on its goroutine.
//
//export qpc_async_result
func qpc_async_result(h C.uintptr_t, matches **C.char, nanos *C.int64_t) C.int {
	a := cgo.Handle(h).Value().(*async)
	*matches = C.CString(a.matches)
	*nanos = C.int64_t(a.nanos)
	return a.blocked
}

// qpc_async_close forgets a finished evaluation (its goroutine has already run
// the logging phase and freed the transaction).
//
//export qpc_async_close
func qpc_async_close(h C.uintptr_t) {
	cgo.Handle(h).Delete()
}
