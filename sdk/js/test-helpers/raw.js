'use strict';
// Helpers for the tests in ../test: temporary plugin directories, in-process plugins that are
// always stopped, and a raw HTTP/1.1 client over net (no http module on the client side, so the
// tests see exactly the bytes a plugin sends). Outside test/ so that `node --test test/` does
// not run this file as a test of its own.

const fs = require('fs');
const net = require('net');
const os = require('os');
const path = require('path');

const { Plugin } = require('..');

const EMPTY = Buffer.alloc(0);

// Every temporary directory made here, removed at exit even if a test's own cleanup never ran.
const TEMP_DIRS = new Set();
process.on('exit', () => {
  for (const dir of TEMP_DIRS) fs.rmSync(dir, { recursive: true, force: true });
});

// A fresh directory under the system's temporary directory (short, so socket paths fit).
function tempDir(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gpjs-'));
  TEMP_DIRS.add(dir);
  t.after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
    TEMP_DIRS.delete(dir);
  });
  return dir;
}

// Resolve with the promise's value, or reject after `ms` milliseconds saying what was awaited.
function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Poll `predicate` until it is true; reject after `ms`.
async function waitFor(predicate, ms = 5000, what = 'a condition') {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

// Start a plugin in this process; it is stopped (and its client connections closed) after the
// test `t`, whatever the outcome. `setup(plugin)` registers methods before start.
async function startPlugin(t, options = {}, setup = null) {
  const plugin = new Plugin({ name: 'Echo', namespace: 'Node', ...options });
  if (setup) setup(plugin);
  t.after(() => withTimeout(plugin.stop(), 10000, `${plugin.label} to stop`));
  await withTimeout(plugin.start(), 5000, `${plugin.label} to start`);
  return plugin;
}

// One client connection speaking raw HTTP/1.1. Responses are handed out in order.
class RawClient {
  static async open(t, sockPath, ms = 3000) {
    const socket = net.connect(sockPath);
    const client = new RawClient(socket);
    t.after(() => client.destroy());
    await withTimeout(
      new Promise((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      }),
      ms,
      `a connection to ${sockPath}`,
    );
    return client;
  }

  constructor(socket) {
    this.socket = socket;
    this.buf = EMPTY;
    this.ready = []; // parsed responses nobody has asked for yet
    this.waiting = []; // {resolve, reject} of response() calls
    this.isClosed = false;
    this.closedPromise = new Promise((resolve) => {
      socket.once('close', () => {
        this.isClosed = true;
        const waiting = this.waiting.splice(0);
        for (const w of waiting) w.reject(new Error('the connection closed without a (complete) response'));
        resolve();
      });
    });
    socket.on('error', () => {}); // seen as 'close'
    socket.on('data', (chunk) => {
      this.buf = Buffer.concat([this.buf, chunk]);
      this.parse();
    });
  }

  write(data) {
    this.socket.write(data);
  }

  // Send a request (Content-Length framing unless the headers say otherwise).
  send(target, body = EMPTY, headers = {}, method = 'POST') {
    const b = Buffer.isBuffer(body) ? body : Buffer.from(body);
    let head = `${method} ${target} HTTP/1.1\r\nHost: test\r\n`;
    const h = { 'Content-Length': String(b.length), ...headers };
    for (const [k, v] of Object.entries(h)) if (v !== null) head += `${k}: ${v}\r\n`;
    this.socket.write(Buffer.concat([Buffer.from(head + '\r\n', 'latin1'), b]));
  }

  // The next response, or a rejection after `ms` or when the connection closes first.
  response(ms = 5000, what = 'a response') {
    if (this.ready.length) return Promise.resolve(this.ready.shift());
    if (this.isClosed) return Promise.reject(new Error('the connection is closed'));
    let entry;
    const p = new Promise((resolve, reject) => {
      entry = { resolve, reject };
      this.waiting.push(entry);
    });
    return withTimeout(p, ms, what).catch((err) => {
      const i = this.waiting.indexOf(entry);
      if (i >= 0) this.waiting.splice(i, 1);
      throw err;
    });
  }

  async request(target, body = EMPTY, headers = {}, ms = 5000) {
    this.send(target, body, headers);
    return this.response(ms, `the answer to ${target}`);
  }

  closed(ms = 5000) {
    return withTimeout(this.closedPromise, ms, 'the connection to close');
  }

  destroy() {
    this.socket.destroy();
  }

  parse() {
    for (;;) {
      const end = this.buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      const lines = this.buf.toString('latin1', 0, end).split('\r\n');
      const m = /^HTTP\/1\.1 (\d{3}) (.*)$/.exec(lines[0]);
      if (!m) throw new Error(`bad status line ${JSON.stringify(lines[0])}`);
      const headers = {};
      for (const line of lines.slice(1)) {
        const colon = line.indexOf(':');
        headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
      }
      const status = Number(m[1]);
      let pos = end + 4;
      let body;
      if (status === 100) {
        this.buf = this.buf.subarray(pos);
        continue;
      }
      if (headers['transfer-encoding'] === 'chunked') {
        const parts = [];
        for (;;) {
          const nl = this.buf.indexOf('\r\n', pos);
          if (nl < 0) return;
          const n = parseInt(this.buf.toString('latin1', pos, nl), 16);
          if (this.buf.length < nl + 2 + n + 2) return;
          parts.push(this.buf.subarray(nl + 2, nl + 2 + n));
          pos = nl + 2 + n + 2;
          if (n === 0) break;
        }
        body = Buffer.concat(parts);
      } else {
        const n = Number(headers['content-length'] || 0);
        if (this.buf.length < pos + n) return;
        body = Buffer.from(this.buf.subarray(pos, pos + n));
        pos += n;
      }
      this.buf = this.buf.subarray(pos);
      const res = { status, reason: m[2], headers, body, json: () => JSON.parse(body.toString('utf8')) };
      const w = this.waiting.shift();
      if (w) w.resolve(res);
      else this.ready.push(res);
    }
  }
}

// Split a reliable-subscription answer into its records (4-byte big-endian length, then data).
function records(body) {
  const out = [];
  let pos = 0;
  while (pos < body.length) {
    const n = body.readUInt32BE(pos);
    out.push(Buffer.from(body.subarray(pos + 4, pos + 4 + n)));
    pos += 4 + n;
  }
  if (pos !== body.length) throw new Error('truncated record');
  return out;
}

module.exports = { EMPTY, RawClient, records, startPlugin, tempDir, waitFor, withTimeout };
