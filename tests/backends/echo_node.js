// Strict backend for tests/test_strict_backends.py: Node.js `http` (llhttp parser).
// Answers every request with JSON: method, body length, sha256 of the body, and the
// framing fields exactly as received, and the names of all fields. /status/NNN answers NNN with a Content-Length
// of 5 and the body "hello" (which Node leaves out where the status has no body).
// Prints the port it listens on, then serves until killed.
"use strict";
const http = require("http");
const crypto = require("crypto");

const server = http.createServer((req, res) => {
  const hash = crypto.createHash("sha256");
  let length = 0;
  req.on("data", (chunk) => {
    length += chunk.length;
    hash.update(chunk);
  });
  req.on("end", () => {
    const status = /^\/status\/(\d{3})$/.exec(req.url);
    if (status) {
      res.writeHead(Number(status[1]), { "content-length": "5" });
      res.end(req.method === "HEAD" ? undefined : "hello");
      return;
    }
    const framing = [];
    const names = [];
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      const name = req.rawHeaders[i].toLowerCase();
      names.push(name);
      if (name === "content-length" || name === "transfer-encoding") {
        framing.push([name, req.rawHeaders[i + 1]]);
      }
    }
    const body = JSON.stringify({
      method: req.method,
      length: length,
      sha256: hash.digest("hex"),
      framing: framing,
      names: names,
    });
    res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
    res.end(req.method === "HEAD" ? undefined : body);
  });
});
server.keepAliveTimeout = 60000;
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`${server.address().port}\n`);
});
