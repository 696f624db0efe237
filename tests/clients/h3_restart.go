// A quic-go HTTP/3 client for the stateless-reset check (tests/test_quic_fleet.py).
//
// Usage: h3_restart URL CAFILE. It sends GET URL once per line read on stdin, over
// one http3.Transport (the connection is kept between requests and a new one is
// dialled once the old one is gone), and prints one JSON line per request:
// {"status": 200, "seconds": 0.003} or {"error": "...", "reset": true, "seconds": ...}.
// "reset" says whether the request failed with quic-go's StatelessResetError.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

func main() {
	pem, err := os.ReadFile(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	transport := &http3.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "localhost"},
		QUICConfig:      &quic.Config{MaxIdleTimeout: 30 * time.Second},
	}
	client := &http.Client{Transport: transport, Timeout: 20 * time.Second}
	out := json.NewEncoder(os.Stdout)
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		started := time.Now()
		resp, err := client.Get(os.Args[1])
		result := map[string]any{}
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			result["status"] = resp.StatusCode
		}
		if err != nil {
			var reset *quic.StatelessResetError
			result["error"] = err.Error()
			result["reset"] = errors.As(err, &reset)
		}
		result["seconds"] = time.Since(started).Seconds()
		out.Encode(result)
	}
}
