// Package main is a C shared library over Coraza v3 with the OWASP CRS 4 embedded,
// loaded by quicproxy/waf/_coraza.py through ctypes.
//
// Handles (rule sets, transactions) are cgo.Handle numbers. Strings the library
// returns are malloc'd and released by the caller with qpc_free. Every exported
// call is safe to make from any thread; one transaction is used by one thread at
// a time.
package main

/*
#include <stdlib.h>
#include <stdint.h>
*/
import "C"

import (
	"encoding/binary"
	"fmt"
	"runtime/cgo"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"unsafe"

	"github.com/corazawaf/coraza/v3"
	"github.com/corazawaf/coraza/v3/experimental"
	"github.com/corazawaf/coraza/v3/experimental/plugins/plugintypes"
	"github.com/corazawaf/coraza/v3/types"
)

const (
	corazaModule = "github.com/corazawaf/coraza/v3"
	crsModule    = "github.com/corazawaf/coraza-coreruleset/v4"
)

func main() {}

func moduleVersion(path string) string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	for _, dep := range info.Deps {
		if dep.Path == path {
			return strings.TrimPrefix(dep.Version, "v")
		}
	}
	return "unknown"
}

//export qpc_versions
func qpc_versions() *C.char {
	return C.CString(moduleVersion(corazaModule) + " " + moduleVersion(crsModule))
}

//export qpc_free
func qpc_free(p *C.char) {
	C.free(unsafe.Pointer(p))
}

// qpc_waf_new parses directives (which may Include @crs-setup.conf.example,
// @owasp_crs/*.conf and files on disk). Returns 0 and sets *errOut on failure.
//
//export qpc_waf_new
func qpc_waf_new(directives *C.char, errOut **C.char) C.uintptr_t {
	cfg := coraza.NewWAFConfig().
		WithRootFS(rootFS{}).
		WithDirectives(C.GoString(directives))
	waf, err := coraza.NewWAF(cfg)
	if err != nil {
		*errOut = C.CString(strings.Join(strings.Fields(err.Error()), " "))
		return 0
	}
	return C.uintptr_t(cgo.NewHandle(&ruleSet{WAF: waf}))
}

//export qpc_waf_rules
func qpc_waf_rules(h C.uintptr_t) C.int {
	if counted, ok := rules(h).WAF.(experimental.WAFWithRules); ok {
		return C.int(counted.RulesCount())
	}
	return -1
}

// ruleSet is a compiled rule set and the number of goroutines using it.
type ruleSet struct {
	coraza.WAF
	pending atomic.Int64
}

func rules(h C.uintptr_t) *ruleSet {
	return cgo.Handle(h).Value().(*ruleSet)
}

//export qpc_waf_free
func qpc_waf_free(h C.uintptr_t) {
	cgo.Handle(h).Delete()
}

// guard turns a panic inside the engine into the failure code -1, so a bad
// request costs its own verdict (the proxy applies fail open/closed) and not
// the whole process.
func guard(code *C.int) {
	if recover() != nil {
		*code = -1
	}
}

func tx(h C.uintptr_t) types.Transaction {
	return cgo.Handle(h).Value().(types.Transaction)
}

func status(it *types.Interruption) C.int {
	if it == nil {
		return 0
	}
	if it.Status < 300 {
		return 403
	}
	return C.int(it.Status)
}

// qpc_tx_new starts a transaction and runs the connection, URI and header
// phases. headers holds (u32 name length, name, u32 value length, value)...
// little endian. *blocked is the status to block with, 0 when not blocked,
// -1 when the engine failed (the handle, if not 0, must still be closed).
//
//export qpc_tx_new
func qpc_tx_new(
	h C.uintptr_t,
	client *C.char, clientPort C.int, server *C.char, serverPort C.int,
	uri *C.char, method *C.char, protocol *C.char,
	headers *C.char, headersLen C.int, blocked *C.int,
) (handle C.uintptr_t) {
	defer guard(blocked)
	t := startTx(h, client, clientPort, server, serverPort, uri, method, protocol, headers, headersLen)
	handle = C.uintptr_t(cgo.NewHandle(t))
	*blocked = status(t.ProcessRequestHeaders())
	return handle
}

// qpc_tx_eval is qpc_tx_new, qpc_tx_body (when bodyLen > 0) and qpc_tx_finish
// in one call (one GIL hand-over for the caller instead of four), for a
// request whose whole inspected body is at hand. *matches receives what
// qpc_tx_matches would return (free it with qpc_free).
//
//export qpc_tx_eval
func qpc_tx_eval(
	h C.uintptr_t,
	client *C.char, clientPort C.int, server *C.char, serverPort C.int,
	uri *C.char, method *C.char, protocol *C.char,
	headers *C.char, headersLen C.int, body *C.char, bodyLen C.int,
	blocked *C.int, matches **C.char,
) (handle C.uintptr_t) {
	defer guard(blocked)
	t := startTx(h, client, clientPort, server, serverPort, uri, method, protocol, headers, headersLen)
	handle = C.uintptr_t(cgo.NewHandle(t))
	code, lines := evaluate(t, C.GoBytes(unsafe.Pointer(body), bodyLen))
	*blocked = code
	*matches = C.CString(lines)
	return handle
}

// evaluate runs every request phase of a transaction whose connection, URI and
// headers are in (the body phase too when body is not empty): the status to
// block with, 0 or -1, and the logged matches as qpc_tx_matches lists them.
func evaluate(t types.Transaction, body []byte) (C.int, string) {
	blocked := status(t.ProcessRequestHeaders())
	if blocked == 0 && len(body) > 0 {
		blocked = writeBody(t, body)
	}
	if blocked == 0 {
		blocked = finish(t)
	}
	return blocked, matchLines(t)
}

// startTx opens a transaction and feeds it the connection, URI and headers.
// headers holds (u32 name length, name, u32 value length, value)... little endian.
func startTx(
	h C.uintptr_t,
	client *C.char, clientPort C.int, server *C.char, serverPort C.int,
	uri *C.char, method *C.char, protocol *C.char,
	headers *C.char, headersLen C.int,
) types.Transaction {
	return newTx(rules(h).WAF, copyRequest(
		client, clientPort, server, serverPort, uri, method, protocol, headers, headersLen,
	))
}

// request is a copy of what qpc_tx_new is given, owned by Go.
type request struct {
	client, server         string
	clientPort, serverPort int
	uri, method, protocol  string
	headers                []byte
}

func copyRequest(
	client *C.char, clientPort C.int, server *C.char, serverPort C.int,
	uri *C.char, method *C.char, protocol *C.char,
	headers *C.char, headersLen C.int,
) request {
	return request{
		client: C.GoString(client), clientPort: int(clientPort),
		server: C.GoString(server), serverPort: int(serverPort),
		uri: C.GoString(uri), method: C.GoString(method), protocol: C.GoString(protocol),
		headers: C.GoBytes(unsafe.Pointer(headers), headersLen),
	}
}

func newTx(waf coraza.WAF, r request) types.Transaction {
	t := waf.NewTransaction()
	t.ProcessConnection(r.client, r.clientPort, r.server, r.serverPort)
	t.ProcessURI(r.uri, r.method, r.protocol)
	data := r.headers
	for len(data) >= 4 {
		var parts [2]string
		for i := range parts {
			size := int(binary.LittleEndian.Uint32(data))
			data = data[4:]
			if size > len(data) {
				size = len(data)
			}
			parts[i] = string(data[:size])
			data = data[size:]
			if i == 0 && len(data) < 4 {
				data = nil
				break
			}
		}
		if parts[0] == "host" {
			t.SetServerName(hostOnly(parts[1]))
		}
		t.AddRequestHeader(parts[0], parts[1])
	}
	return t
}

func hostOnly(authority string) string {
	if strings.HasPrefix(authority, "[") {
		if end := strings.Index(authority, "]"); end > 0 {
			return authority[1:end]
		}
	}
	if i := strings.LastIndex(authority, ":"); i >= 0 {
		return authority[:i]
	}
	return authority
}

// setBodyLength sets REQUEST_BODY_LENGTH, which the JSON and multipart
// processors leave unset and the body error rules compare with the limit.
func setBodyLength(t types.Transaction, n int) {
	if withVars, ok := t.(interface {
		Variables() plugintypes.TransactionVariables
	}); ok {
		if length, ok := withVars.Variables().RequestBodyLength().(interface{ Set(string) }); ok {
			length.Set(strconv.Itoa(n))
		}
	}
}

// qpc_tx_body hands over the whole (inspected) body in one call; the status
// to block with, or 0. A body at the limit runs the body phase right away.
//
//export qpc_tx_body
func qpc_tx_body(h C.uintptr_t, data *C.char, size C.int) (code C.int) {
	defer guard(&code)
	return writeBody(tx(h), C.GoBytes(unsafe.Pointer(data), size))
}

func writeBody(t types.Transaction, body []byte) C.int {
	setBodyLength(t, len(body))
	it, _, err := t.WriteRequestBody(body)
	if err != nil {
		return -1
	}
	return status(it)
}

// qpc_tx_finish runs the request body phase (unless the body write did);
// the status to block with, or 0.
//
//export qpc_tx_finish
func qpc_tx_finish(h C.uintptr_t) (code C.int) {
	defer guard(&code)
	return finish(tx(h))
}

func finish(t types.Transaction) C.int {
	it, err := t.ProcessRequestBody()
	if err != nil {
		return -1
	}
	return status(it)
}

// qpc_tx_matches lists the logged rule matches, one per line:
// "id<TAB>severity number or -1<TAB>message<TAB>variable<TAB>logdata", where
// variable is the first matched COLLECTION:key and logdata the rule's expanded
// logdata cut to DataLimit bytes (tabs and line breaks become spaces).
//
//export qpc_tx_matches
func qpc_tx_matches(h C.uintptr_t) *C.char {
	return C.CString(matchLines(tx(h)))
}

// DataLimit bounds the logdata of one match line (the proxy cuts it further).
const DataLimit = 512

func oneLine(text string, limit int) string {
	if len(text) > limit {
		text = text[:limit]
	}
	return strings.Map(func(r rune) rune {
		if r == '\n' || r == '\t' || r == '\r' {
			return ' '
		}
		return r
	}, text)
}

// ScoreRule is the rule (quicproxy/waf/_rules.py) whose message carries the anomaly
// scores; its line goes first, so a verdict cut at VerdictLimit still has it.
const ScoreRule = 99031

func matchLines(t types.Transaction) string {
	var first, out strings.Builder
	for _, m := range t.MatchedRules() {
		if logged, ok := m.(interface{ Log() bool }); ok && !logged.Log() {
			continue
		}
		rule := m.Rule()
		variable := ""
		for _, d := range m.MatchedDatas() {
			variable = d.Variable().Name()
			if d.Key() != "" {
				variable += ":" + d.Key()
			}
			break
		}
		line := &out
		if rule.ID() == ScoreRule {
			line = &first
		}
		fmt.Fprintf(line, "%d\t%d\t%s\t%s\t%s\n", rule.ID(), int(rule.Severity()),
			oneLine(m.Message(), 1024), oneLine(variable, 256), oneLine(m.Data(), DataLimit))
	}
	return first.String() + out.String()
}

// qpc_tx_close runs the logging phase and frees the transaction.
//
//export qpc_tx_close
func qpc_tx_close(h C.uintptr_t) {
	var ignored C.int
	defer guard(&ignored)
	defer cgo.Handle(h).Delete()
	t := tx(h)
	t.ProcessLogging()
	_ = t.Close()
}
