'use strict';
// goplug for Node.js: serve a plugin over the goplug wire protocol (docs/PROTOCOL.md).
//
// Standard library only. A Plugin is an HTTP/1.1 server on a Unix stream socket, announced by a
// `.pconf` file in the plugin directory. It implements the goplug/1 extensions: reliable
// subscriptions (numbered, acknowledged batches with back-pressure) and JSON error bodies.
//
//   const { Plugin } = require('goplug'); // npm install path/to/sdk/js
//   const plugin = new Plugin({ location: '/tmp/plugins', name: 'Echo', namespace: 'Node' });
//   plugin.registerMethod('Echo', (input) => input);
//   plugin.stopOnSignals();
//   await plugin.start();
//
// Two HTTP engines serve the same routes. The default, 'net', is a small HTTP/1.1 server on
// net.Server that does exactly what the protocol needs (Content-Length and chunked request
// bodies, bare-LF heads, pipelining, limits checked before reading); it answers a small call in
// about half the CPU time of Node's http module. engine: 'http' uses http.createServer instead.

const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const net = require('net');
const os = require('os');
const path = require('path');

const PROTOCOL_VERSION = 'goplug/1';
const VERSION = require('./package.json').version;
const RESERVED = new Set(['Activate', 'Ping', 'RegisterCallback', 'Unsubscribe', 'Stop']);
const SUBSCRIBER_RE = /^[A-Za-z0-9_-]{1,64}$/;
const ACK_RE = /^[0-9]{1,15}$/;
const CONTROL_RE = /[\x00-\x1f\x7f]/;
// sun_path holds 108 bytes on Linux (104 on macOS and the BSDs), the final NUL included.
const MAX_SOCK_PATH = process.platform === 'linux' ? 107 : 103;
const EMPTY = Buffer.alloc(0);
const MAX_ENDED = 4096; // unsubscribed (token, name) pairs remembered (PROTOCOL.md §5)

const DEFAULTS = {
  engine: 'net', // 'net' (lean HTTP/1.1 on net.Server) or 'http' (http.createServer)
  confExt: '.pconf',
  maxHeadBytes: 64 * 1024, // request line plus header lines
  maxHeaderLines: 100,
  maxBody: 64 * 1024 * 1024,
  queueSize: 10000, // notifications held per subscriber (sent but unacknowledged included)
  maxBatch: 1024, // most notifications in one poll answer
  maxBatchBytes: 4 * 1024 * 1024, // most bytes in one poll answer (one notification always goes)
  notifyTimeout: 10000, // ms notify() waits for room in a full queue
  subscriberExpiry: 60000, // ms a subscriber with no poll waiting is kept
  requestTimeout: 10000, // ms for a request to arrive whole, from its first byte (408 then close)
  maxConnections: 1024, // more get 503 and are closed
  maxPipeline: 64, // requests of one connection in progress before it is read no further
  stopGrace: 2000, // ms given to calls in progress when stopping
};

// ---------------------------------------------------------------------------------------------
// Errors

class GoPlugError extends Error {
  constructor(message, code) {
    super(message);
    this.name = new.target.name;
    this.code = code;
  }
}
class ConfigError extends GoPlugError {
  constructor(message) { super(message, 'CONFIG_ERROR'); }
}
class PluginAlreadyRunning extends GoPlugError {
  constructor(message) { super(message, 'PLUGIN_ALREADY_RUNNING'); }
}
class CallbackNotFound extends GoPlugError {
  constructor(name) { super(`no subscriber for callback ${JSON.stringify(name)}`, 'CALLBACK_NOT_FOUND'); }
}
class NotifyTimeout extends GoPlugError {
  constructor(name, ms, notified) {
    super(`notify ${JSON.stringify(name)}: a subscriber's queue stayed full for ${ms} ms`, 'NOTIFY_TIMEOUT');
    this.notified = notified; // subscribers that did get the notification
  }
}
class PluginStopped extends GoPlugError {
  constructor() { super('the plugin is stopping', 'PLUGIN_STOPPED'); }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

function checkName(value, what) {
  if (typeof value !== 'string') throw new ConfigError(`the ${what} must be a string`);
  if (what === 'name' && value === '') throw new ConfigError('the plugin name must not be empty');
  if (CONTROL_RE.test(value) || value.includes('/') || value.includes('@') || value === '.' || value === '..') {
    throw new ConfigError(`invalid ${what} ${JSON.stringify(value)}: no '/', '@', '.', '..' or control characters`);
  }
}

function toBuffer(value, what) {
  if (value === undefined || value === null) return EMPTY;
  if (Buffer.isBuffer(value)) return value;
  if (typeof value === 'string') return Buffer.from(value, 'utf8');
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  throw new TypeError(`${what} must return a Buffer, a string or nothing, not ${typeof value}`);
}

function errorBody(type, message, traceback) {
  return Buffer.from(JSON.stringify({ type, message, traceback: traceback || '' }), 'utf8');
}

function describeError(err) {
  if (err instanceof Error) {
    return { type: err.name || (err.constructor && err.constructor.name) || 'Error', message: err.message, traceback: err.stack || '' };
  }
  return { type: typeof err, message: String(err), traceback: '' };
}

// The path part of a Url ("unix://host/base/" -> "/base"), used as an optional route prefix.
function urlPath(url) {
  const m = /^[A-Za-z][A-Za-z0-9+.-]*:\/\/[^/?#]*([^?#]*)/.exec(url);
  return m ? m[1].replace(/\/+$/, '') : '';
}

// The route a request target selects: its first path segment, %-decoded; null if malformed.
function routeOf(target, prefix) {
  let p = target;
  const q = p.indexOf('?');
  if (q >= 0) p = p.slice(0, q);
  if (p.charCodeAt(0) !== 47 /* / */) {
    // absolute-form ("http://host/Route"): drop scheme and authority
    const m = /^[A-Za-z][A-Za-z0-9+.-]*:\/\/[^/]*(\/.*)?$/.exec(p);
    if (!m) return null;
    p = m[1] || '/';
  }
  if (prefix && p.startsWith(prefix + '/')) p = p.slice(prefix.length);
  const end = p.indexOf('/', 1);
  const seg = end < 0 ? p.slice(1) : p.slice(1, end);
  if (seg.indexOf('%') < 0) return seg;
  try {
    return decodeURIComponent(seg);
  } catch (_) {
    return null;
  }
}

function unlinkQuiet(p) {
  try {
    fs.unlinkSync(p);
  } catch (err) {
    if (err.code !== 'ENOENT') throw err;
  }
}

// A FIFO with O(1) amortised push and shift.
class Deque {
  constructor() { this.items = []; this.head = 0; }
  get length() { return this.items.length - this.head; }
  at(i) { return this.items[this.head + i]; }
  push(x) { this.items.push(x); }
  peek() { return this.items[this.head]; }
  shift() {
    const x = this.items[this.head];
    this.items[this.head++] = undefined;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    } else if (this.head === this.items.length) {
      this.items.length = 0;
      this.head = 0;
    }
    return x;
  }
  clear() { this.items = []; this.head = 0; }
}

// ---------------------------------------------------------------------------------------------
// Subscriptions (PROTOCOL.md §5)

// One queue of notifications for one (subscriber, callback name). A legacy subscriber (no
// X-Goplug-Subscriber header: the Go registry) has token null and is keyed by the name alone.
class Subscriber {
  constructor(name, token) {
    this.name = name;
    this.token = token;
    this.queue = new Deque(); // reliable: {seq, data}, kept until acknowledged; legacy: data
    this.nextSeq = 1;
    this.waiters = []; // the polls waiting: replies (see NetReply / HttpReply)
    this.idleSince = Date.now();
    this.blocked = new Deque(); // notifies waiting for room in the queue, in call order
    this.flushScheduled = false;
    this.gone = false;
  }
}

// One notify() call that had to wait for room in one or more subscribers' queues.
class PendingNotify {
  constructor(table, name, data, count, resolve, reject) {
    this.table = table;
    this.name = name;
    this.data = data;
    this.count = count; // subscribers that have it queued
    this.waiting = 0;
    this.failed = null;
    this.resolve = resolve;
    this.reject = reject;
    this.timer = null;
  }

  settle(entry, outcome) {
    if (entry.done) return;
    entry.done = true;
    if (outcome === 'appended') this.count++;
    else if (outcome === 'timeout' && !this.failed) this.failed = new NotifyTimeout(this.name, this.table.notifyTimeout, 0);
    else if (outcome === 'stopped') this.failed = new PluginStopped();
    if (--this.waiting > 0) return;
    clearTimeout(this.timer);
    if (this.failed) {
      if (this.failed instanceof NotifyTimeout) this.failed.notified = this.count;
      this.reject(this.failed);
    } else if (this.count === 0) {
      // Every subscriber it waited for went away (unsubscribed or expired): nobody got it.
      this.reject(new CallbackNotFound(this.name));
    } else {
      this.resolve(this.count);
    }
  }
}

class SubscriptionTable {
  constructor(plugin, opts) {
    this.plugin = plugin;
    this.queueSize = opts.queueSize;
    this.notifyTimeout = opts.notifyTimeout;
    this.expiry = opts.subscriberExpiry;
    this.maxBatch = opts.maxBatch;
    this.maxBatchBytes = Math.min(opts.maxBatchBytes, opts.maxBody);
    this.byName = new Map(); // name -> Map(key -> Subscriber)
    this.polls = new Set(); // every unanswered poll, superseded legacy ones included
    this.ended = new Set(); // keys of (token, name) that unsubscribed, oldest first
    this.stopped = false;
    const every = Math.max(20, Math.min(1000, Math.floor(this.expiry / 4)));
    this.sweeper = setInterval(() => this.sweep(), every);
    this.sweeper.unref();
  }

  names() {
    return [...this.byName.keys()];
  }

  static key(token) {
    return token === null ? '' : 't:' + token;
  }

  get(name, token, create) {
    let subs = this.byName.get(name);
    let sub = subs && subs.get(SubscriptionTable.key(token));
    if (!sub && create) {
      if (!subs) this.byName.set(name, (subs = new Map()));
      sub = new Subscriber(name, token);
      subs.set(SubscriptionTable.key(token), sub);
    }
    return sub;
  }

  forget(sub) {
    if (sub.gone) return;
    sub.gone = true;
    const subs = this.byName.get(sub.name);
    if (subs && subs.get(SubscriptionTable.key(sub.token)) === sub) {
      subs.delete(SubscriptionTable.key(sub.token));
      if (subs.size === 0) this.byName.delete(sub.name);
    }
    // A poll still waiting for a forgotten subscription ends without an answer (its connection
    // closes), as with the Python plugin: no notification can come for it any more.
    const waiters = sub.waiters;
    sub.waiters = [];
    for (const reply of waiters) reply.abort();
    sub.queue.clear();
    while (sub.blocked.length) {
      const e = sub.blocked.shift();
      e.pending.settle(e, 'gone');
    }
  }

  sweep() {
    const now = Date.now();
    for (const subs of [...this.byName.values()]) {
      for (const sub of [...subs.values()]) {
        if (sub.waiters.length === 0 && now - sub.idleSince > this.expiry) this.forget(sub);
      }
    }
  }

  notify(name, data) {
    if (this.stopped) return Promise.reject(new PluginStopped());
    const subs = this.byName.get(name);
    if (!subs || subs.size === 0) return Promise.reject(new CallbackNotFound(name));
    let count = 0;
    let full = null;
    for (const sub of subs.values()) {
      if (sub.blocked.length === 0 && sub.queue.length < this.queueSize) {
        this.append(sub, data);
        count++;
      } else {
        (full || (full = [])).push(sub);
      }
    }
    if (!full) return Promise.resolve(count);
    // Back-pressure: wait for room in the full queues, behind notifies blocked earlier.
    return new Promise((resolve, reject) => {
      const pending = new PendingNotify(this, name, data, count, resolve, reject);
      const entries = full.map((sub) => ({ sub, pending, done: false }));
      pending.waiting = entries.length;
      for (const e of entries) e.sub.blocked.push(e);
      pending.timer = setTimeout(() => {
        for (const e of entries) {
          if (e.done) continue;
          const kept = new Deque();
          while (e.sub.blocked.length) {
            const x = e.sub.blocked.shift();
            if (x !== e) kept.push(x);
          }
          e.sub.blocked = kept;
          pending.settle(e, 'timeout');
        }
      }, this.notifyTimeout);
    });
  }

  append(sub, data) {
    if (sub.token === null) sub.queue.push(data);
    else sub.queue.push({ seq: sub.nextSeq++, data });
    if (sub.waiters.length && !sub.flushScheduled) {
      // Answer on the next turn of the loop, so notifications made together go in one batch.
      sub.flushScheduled = true;
      setImmediate(() => {
        sub.flushScheduled = false;
        if (sub.waiters.length && !sub.gone && sub.queue.length) this.answer(sub);
      });
    }
  }

  // Move blocked notifies into the queue while it has room.
  drain(sub) {
    while (sub.blocked.length && sub.queue.length < this.queueSize) {
      const e = sub.blocked.shift();
      this.append(sub, e.pending.data);
      e.pending.settle(e, 'appended');
    }
  }

  // Answer the waiting poll(s) of `sub` with what its queue holds (the queue is not empty).
  answer(sub) {
    const waiters = sub.waiters.filter((reply) => reply.open);
    sub.waiters = [];
    sub.idleSince = Date.now();
    if (waiters.length === 0) return;
    if (sub.token === null) {
      // Legacy (GoPlug): one notification per answer, raw body, no numbering, no redelivery.
      this.plugin._send(waiters[0], 200, sub.queue.shift(), null);
      this.drain(sub);
      return;
    }
    // Reliable: the oldest unacknowledged notifications, as many as the batch bounds allow
    // (at least one); they stay queued until a poll acknowledges them.
    const q = sub.queue;
    let k = 1;
    let total = 4 + q.peek().data.length;
    while (k < q.length && k < this.maxBatch && total + 4 + q.at(k).data.length <= this.maxBatchBytes) {
      total += 4 + q.at(k).data.length;
      k++;
    }
    const body = Buffer.allocUnsafe(total);
    let off = 0;
    for (let i = 0; i < k; i++) {
      const d = q.at(i).data;
      body.writeUInt32BE(d.length, off);
      off += 4;
      d.copy(body, off);
      off += d.length;
    }
    const headers = { 'X-Goplug-Seq': String(q.peek().seq), 'X-Goplug-Count': String(k) };
    // Several polls of one subscriber (a cut the plugin has not noticed yet) all get the same
    // batch; the registry skips the numbers it has seen.
    for (const reply of waiters) this.plugin._send(reply, 200, body, headers);
  }

  // POST /RegisterCallback
  poll(reply, name, token, ack) {
    if (token !== null && this.ended.has(SubscriptionTable.key(token) + '\n' + name)) {
      // A poll sent before its subscriber's /Unsubscribe (on another connection) and read
      // after it: no answer, its connection closes, the subscriber stays gone.
      reply.abort();
      return;
    }
    const sub = this.get(name, token, true);
    reply.poll = true;
    if (token !== null) {
      // A subscriber whose queue was forgotten (expiry) keeps counting after its Ack, so a
      // registry never mistakes new notifications for ones it has already seen.
      if (ack >= sub.nextSeq) sub.nextSeq = ack + 1;
      const q = sub.queue;
      while (q.length && q.peek().seq <= ack) q.shift();
      this.drain(sub);
      sub.waiters.push(reply);
    } else {
      // GoPlug: a later poll for the same name takes over the slot; the earlier one stays
      // unanswered (an answer would hand the Go registry a notification that never was).
      sub.waiters = [reply];
    }
    this.polls.add(reply);
    reply.onClose(() => {
      this.polls.delete(reply);
      const i = sub.waiters.indexOf(reply);
      if (i >= 0) {
        sub.waiters.splice(i, 1);
        if (sub.waiters.length === 0) sub.idleSince = Date.now();
      }
    });
    if (sub.queue.length) this.answer(sub);
  }

  // POST /Unsubscribe
  unsubscribe(name, token) {
    const sub = this.get(name, token, false);
    if (sub) this.forget(sub);
    if (token !== null) {
      const key = SubscriptionTable.key(token) + '\n' + name;
      this.ended.delete(key);
      this.ended.add(key);
      if (this.ended.size > MAX_ENDED) this.ended.delete(this.ended.values().next().value);
    }
  }

  stop() {
    this.stopped = true;
    clearInterval(this.sweeper);
    for (const subs of [...this.byName.values()]) {
      for (const sub of [...subs.values()]) {
        sub.gone = true;
        sub.waiters = [];
        while (sub.blocked.length) {
          const e = sub.blocked.shift();
          e.pending.settle(e, 'stopped');
        }
      }
    }
    this.byName.clear();
    for (const reply of [...this.polls]) {
      this.plugin._sendError(reply, 503, 'Stopping', 'the plugin is stopping', true);
    }
    this.polls.clear();
  }
}

// ---------------------------------------------------------------------------------------------
// Replies: what a route answers into. Both engines provide the same small interface:
//   reply.open          true until answered, or until its connection is gone
//   reply.send(status, reason, body, headers, close)
//   reply.onClose(fn)   fn() once, when the reply is answered or its connection is gone
//   reply.abort()       close the connection without an answer

const H_START = 0; // waiting for a request head
const H_BODY = 1; // reading a Content-Length body
const H_CHUNK_SIZE = 2; // chunked: the size line
const H_CHUNK_DATA = 3;
const H_CHUNK_CRLF = 4;
const H_TRAILERS = 5;

const TOKEN_RE = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
const VERSION_RE = /^HTTP\/1\.[0-9]$/;
const HEX_RE = /^[0-9A-Fa-f]{1,15}$/;
const SMALL_WRITE = 16 * 1024; // answers below this go out as one buffer

class NetReply {
  constructor(conn, keepAlive, http10, head) {
    this.conn = conn;
    this.keepAlive = keepAlive;
    this.http10 = http10;
    this.head = head; // a HEAD request: no body in the answer
    this.out = null;
    this.close = false;
    this.done = false;
    this.closeFns = null;
    this.poll = false; // a /RegisterCallback long poll
  }

  get open() {
    return !this.done && !this.conn.dead;
  }

  send(status, reason, body, headers, close) {
    if (!this.open) return;
    this.done = true;
    close = close || !this.keepAlive || this.conn.plugin._stopping;
    let head;
    if (status === 200 && headers === null && !close && !this.http10) {
      head = 'HTTP/1.1 200 OK\r\nContent-Length: ' + body.length + '\r\n\r\n';
    } else {
      head = 'HTTP/1.1 ' + status + ' ' + reason + '\r\nContent-Length: ' + body.length + '\r\n';
      if (headers !== null) for (const k in headers) head += k + ': ' + headers[k] + '\r\n';
      if (close) head += 'Connection: close\r\n';
      else if (this.http10) head += 'Connection: keep-alive\r\n';
      head += '\r\n';
    }
    this.out = this.head ? [head, EMPTY] : [head, body];
    this.close = close;
    this.conn.flush();
    this._closed();
  }

  onClose(fn) {
    if (this.done || this.conn.dead) fn();
    else (this.closeFns || (this.closeFns = [])).push(fn);
  }

  _closed() {
    const fns = this.closeFns;
    this.closeFns = null;
    if (fns) for (const fn of fns) fn();
  }

  abort() {
    this.conn.socket.destroy();
  }
}

// One client connection of the 'net' engine: parses requests (pipelined or not) and writes
// the answers in request order.
class NetConnection {
  constructor(plugin, socket) {
    this.plugin = plugin;
    this.s = plugin.settings;
    this.socket = socket;
    this.buf = null; // bytes received and not parsed yet
    this.state = H_START;
    this.req = null; // the request being read
    this.body = null; // Content-Length body being filled
    this.fill = 0;
    this.need = 0;
    this.chunks = null; // chunked body parts
    this.size = 0; // chunked body size so far
    this.trailerBytes = 0;
    this.replies = []; // answers owed, in request order
    this.reading = true; // false once a request asked to close, or after an error
    this.parsing = false;
    this.paused = false;
    this.peerEnded = false;
    this.ending = false;
    this.dead = false;
    this.fresh = true; // no byte received yet
    this.started = Date.now(); // when the request being received began (0: none)
    socket.on('data', (d) => this.onData(d));
    socket.on('end', () => this.onEnd());
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.onClose());
    socket.on('drain', () => this.flow());
  }

  onData(chunk) {
    if (!this.reading) return;
    if (this.started === 0 || this.fresh) this.started = Date.now();
    this.fresh = false;
    if (this.buf === null) this.buf = chunk;
    else this.buf = Buffer.concat([this.buf, chunk]);
    this.parse();
  }

  onEnd() {
    this.peerEnded = true;
    if (this.state !== H_START || this.buf !== null) {
      // The peer stopped in the middle of a request: nothing more can come.
      this.reading = false;
      this.buf = null;
    }
    if (this.replies.some((r) => r.poll)) {
      // A long poll whose peer hung up is over: its subscriber starts to age (as with the
      // Python plugin, which also takes end-of-file as the end of a poll).
      this.socket.destroy();
    } else if (this.replies.length === 0) {
      this.socket.end();
    }
  }

  onClose() {
    this.dead = true;
    this.reading = false;
    this.buf = null;
    const owed = this.replies;
    this.replies = [];
    for (const r of owed) r._closed();
    this.plugin._connections.delete(this);
  }

  // Refuse the connection's current request (malformed, too large, too slow): answer after
  // the answers already owed, then close.
  refuse(status, reason, type, message) {
    this.reading = false;
    this.buf = null;
    const r = new NetReply(this, false, false, false);
    this.replies.push(r);
    r.send(status, reason, errorBody(type, message, ''), { 'Content-Type': 'application/json' }, true);
  }

  parse() {
    if (this.parsing) return;
    this.parsing = true;
    try {
      this._parse();
    } finally {
      this.parsing = false;
    }
  }

  _parse() {
    let buf = this.buf;
    let pos = 0;
    const s = this.s;
    while (buf !== null && pos < buf.length && this.reading) {
      const state = this.state;
      if (state === H_START) {
        if (this.replies.length >= s.maxPipeline) break; // read on when answers have gone out
        const end = this.parseHead(buf, pos);
        if (end < 0) {
          if (end === -1 && buf.length - pos > s.maxHeadBytes) {
            this.refuse(400, 'Bad Request', 'ProtocolError', `the request head exceeds ${s.maxHeadBytes} bytes`);
          }
          break;
        }
        pos = end;
      } else if (state === H_BODY) {
        const take = Math.min(buf.length - pos, this.need - this.fill);
        if (this.body === null) {
          if (take === this.need) {
            // the whole body is here: no copy
            const body = buf.subarray(pos, pos + take);
            pos += take;
            this.complete(body);
            continue;
          }
          this.body = Buffer.allocUnsafe(this.need);
        }
        buf.copy(this.body, this.fill, pos, pos + take);
        this.fill += take;
        pos += take;
        if (this.fill === this.need) {
          const body = this.body;
          this.body = null;
          this.complete(body);
        }
      } else if (state === H_CHUNK_SIZE || state === H_TRAILERS) {
        const nl = buf.indexOf(10, pos);
        if (nl < 0) {
          if (buf.length - pos > 4096) this.refuse(400, 'Bad Request', 'ProtocolError', 'chunk framing line too long');
          break;
        }
        let line = buf.toString('latin1', pos, nl);
        pos = nl + 1;
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (state === H_TRAILERS) {
          // Trailer fields are read and ignored.
          this.trailerBytes += line.length + 1;
          if (line === '') this.complete(this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.size));
          else if (this.trailerBytes > s.maxHeadBytes) this.refuse(400, 'Bad Request', 'ProtocolError', 'trailers too long');
          continue;
        }
        const semi = line.indexOf(';');
        const hex = (semi < 0 ? line : line.slice(0, semi)).trim();
        if (!HEX_RE.test(hex)) {
          this.refuse(400, 'Bad Request', 'ProtocolError', `bad chunk size line ${JSON.stringify(line.slice(0, 40))}`);
          break;
        }
        const n = parseInt(hex, 16);
        if (n === 0) {
          this.trailerBytes = 0;
          this.state = H_TRAILERS;
        } else if (this.size + n > s.maxBody) {
          this.refuse(413, 'Content Too Large', 'ProtocolError', `the body exceeds the limit of ${s.maxBody} bytes`);
        } else {
          this.need = n;
          this.state = H_CHUNK_DATA;
        }
      } else if (state === H_CHUNK_DATA) {
        const take = Math.min(buf.length - pos, this.need);
        this.chunks.push(buf.subarray(pos, pos + take));
        this.size += take;
        this.need -= take;
        pos += take;
        if (this.need === 0) this.state = H_CHUNK_CRLF;
      } else {
        // H_CHUNK_CRLF: CRLF or a bare LF after chunk data
        if (buf[pos] === 10) {
          pos += 1;
        } else if (buf[pos] === 13) {
          if (pos + 1 >= buf.length) break;
          if (buf[pos + 1] !== 10) {
            this.refuse(400, 'Bad Request', 'ProtocolError', 'missing CRLF after chunk data');
            break;
          }
          pos += 2;
        } else {
          this.refuse(400, 'Bad Request', 'ProtocolError', 'missing CRLF after chunk data');
          break;
        }
        this.state = H_CHUNK_SIZE;
      }
    }
    if (this.buf === null || !this.reading) {
      this.buf = null;
    } else {
      this.buf = pos < buf.length ? (pos === 0 ? buf : buf.subarray(pos)) : null;
    }
    if (this.buf === null && this.state === H_START) this.started = 0;
    this.flow();
  }

  // Parse one request head starting at pos. Returns the offset after it, -1 if incomplete,
  // -2 after refusing the request.
  parseHead(buf, pos) {
    const s = this.s;
    // Empty lines before a request line are ignored (RFC 9112 §2.2).
    while (pos < buf.length && (buf[pos] === 10 || (buf[pos] === 13 && buf[pos + 1] === 10))) {
      pos += buf[pos] === 10 ? 1 : 2;
    }
    let lineStart = pos;
    let lines = 0;
    let end = -1;
    for (;;) {
      const nl = buf.indexOf(10, lineStart);
      if (nl < 0) break;
      const empty = nl === lineStart || (nl === lineStart + 1 && buf[lineStart] === 13);
      if (empty) {
        end = nl + 1;
        break;
      }
      lines++;
      lineStart = nl + 1;
      if (lines > s.maxHeaderLines + 1) break;
    }
    if (lines > s.maxHeaderLines + 1) {
      this.refuse(400, 'Bad Request', 'ProtocolError', `more than ${s.maxHeaderLines} header lines`);
      return -2;
    }
    if (end < 0) return -1;
    if (end - pos > s.maxHeadBytes) {
      this.refuse(400, 'Bad Request', 'ProtocolError', `the request head exceeds ${s.maxHeadBytes} bytes`);
      return -2;
    }
    const text = buf.toString('latin1', pos, end);
    const nl0 = text.indexOf('\n');
    const line = text.slice(0, text.charCodeAt(nl0 - 1) === 13 ? nl0 - 1 : nl0);
    const sp1 = line.indexOf(' ');
    const sp2 = line.indexOf(' ', sp1 + 1);
    const method = line.slice(0, sp1);
    const target = line.slice(sp1 + 1, sp2);
    const version = line.slice(sp2 + 1);
    if (sp1 <= 0 || sp2 < 0 || target === '' || !TOKEN_RE.test(method) || !VERSION_RE.test(version) || /[\x00-\x20\x7f]/.test(target)) {
      this.refuse(400, 'Bad Request', 'ProtocolError', `bad request line ${JSON.stringify(line.slice(0, 60))}`);
      return -2;
    }
    const http10 = version === 'HTTP/1.0';
    let contentLength = -1;
    let chunked = false;
    let te = null;
    let connection = null;
    let expect = null;
    let subscriber = null;
    let ack = null;
    // Header lines: only the few this server reads are sliced and lower-cased.
    let ls = nl0 + 1;
    for (;;) {
      const le = text.indexOf('\n', ls); // found: the head ends with an empty line
      const e = text.charCodeAt(le - 1) === 13 && le > ls ? le - 1 : le;
      if (e === ls) break;
      const colon = text.indexOf(':', ls);
      const before = text.charCodeAt(colon - 1);
      const first = text.charCodeAt(ls);
      if (colon <= ls || colon >= e || before === 32 || before === 9 || first === 32 || first === 9) {
        this.refuse(400, 'Bad Request', 'ProtocolError', `bad header line ${JSON.stringify(text.slice(ls, Math.min(e, ls + 40)))}`);
        return -2;
      }
      const n = colon - ls;
      if (n === 14 || n === 17 || n === 10 || n === 6 || n === 19 || n === 12) {
        const value = text.slice(colon + 1, e).trim();
        switch (text.slice(ls, colon).toLowerCase()) {
          case 'content-length':
            if (!/^[0-9]{1,20}$/.test(value) || (contentLength >= 0 && Number(value) !== contentLength)) {
              this.refuse(400, 'Bad Request', 'ProtocolError', `bad content-length ${JSON.stringify(value.slice(0, 40))}`);
              return -2;
            }
            contentLength = Number(value);
            break;
          case 'transfer-encoding':
            te = te === null ? value : te + ',' + value;
            break;
          case 'connection':
            connection = connection === null ? value.toLowerCase() : connection + ',' + value.toLowerCase();
            break;
          case 'expect':
            expect = value.toLowerCase();
            break;
          case 'x-goplug-subscriber':
            subscriber = value;
            break;
          case 'x-goplug-ack':
            ack = value;
            break;
          default:
        }
      }
      ls = le + 1;
    }
    if (te !== null) {
      const codings = te.toLowerCase().split(',').map((x) => x.trim()).filter((x) => x !== '');
      if (codings.length !== 1 || codings[0] !== 'chunked') {
        this.refuse(400, 'Bad Request', 'ProtocolError', `unsupported transfer-encoding ${JSON.stringify(te.slice(0, 40))}`);
        return -2;
      }
      if (contentLength >= 0) {
        this.refuse(400, 'Bad Request', 'ProtocolError', 'both content-length and transfer-encoding');
        return -2;
      }
      chunked = true;
    }
    let keepAlive = !http10;
    if (connection !== null) {
      const tokens = connection.split(',').map((x) => x.trim());
      if (tokens.includes('close')) keepAlive = false;
      else if (tokens.includes('keep-alive')) keepAlive = true;
    }
    this.req = {
      method,
      target,
      keepAlive,
      http10: http10 && keepAlive,
      subscriber,
      ack,
    };
    if (contentLength > s.maxBody) {
      this.refuse(413, 'Content Too Large', 'ProtocolError', `the body (${contentLength} bytes) exceeds the limit of ${s.maxBody} bytes`);
      return -2;
    }
    const needsBody = chunked || contentLength > 0;
    if (needsBody && expect === '100-continue' && !http10 && this.replies.length === 0 && end === buf.length) {
      this.socket.write('HTTP/1.1 100 Continue\r\n\r\n');
    }
    if (chunked) {
      this.chunks = [];
      this.size = 0;
      this.state = H_CHUNK_SIZE;
    } else if (contentLength > 0) {
      this.need = contentLength;
      this.fill = 0;
      this.body = null;
      this.state = H_BODY;
    } else {
      this.complete(EMPTY);
    }
    return end;
  }

  // A whole request has arrived: hand it to the plugin.
  complete(body) {
    const req = this.req;
    this.req = null;
    this.chunks = null;
    this.state = H_START;
    this.started = Date.now();
    if (!req.keepAlive) this.reading = false;
    const reply = new NetReply(this, req.keepAlive, req.http10, req.method === 'HEAD');
    this.replies.push(reply);
    this.plugin._handle(req.target, reply, req.subscriber, req.ack, body);
  }

  // Write the answers that are ready, in order.
  flush() {
    const replies = this.replies;
    const socket = this.socket;
    while (replies.length > 0 && replies[0].done) {
      const r = replies.shift();
      if (this.dead || r.out === null) continue;
      const [head, body] = r.out;
      r.out = null;
      if (body.length < SMALL_WRITE) {
        const hl = head.length;
        const out = Buffer.allocUnsafe(hl + body.length);
        out.write(head, 0, hl, 'latin1');
        body.copy(out, hl);
        socket.write(out);
      } else {
        socket.cork();
        socket.write(head, 'latin1');
        socket.write(body);
        socket.uncork();
      }
      if (r.close) {
        this.reading = false;
        this.buf = null;
        for (const rest of replies.splice(0)) rest._closed();
        this.end();
        return;
      }
    }
    if (replies.length === 0 && (this.peerEnded || (this.plugin._stopping && !this.parsing))) {
      this.end();
      return;
    }
    if (!this.parsing && this.buf !== null && this.reading && replies.length < this.s.maxPipeline) this.parse();
    else this.flow();
  }

  // Read from the socket only while the answers owed and the bytes waiting to be sent are few.
  flow() {
    if (this.dead) return;
    const hold = this.replies.length >= this.s.maxPipeline || this.socket.writableLength > 4 * 1024 * 1024;
    if (hold && !this.paused) {
      this.paused = true;
      this.socket.pause();
    } else if (!hold && this.paused) {
      this.paused = false;
      this.socket.resume();
      if (!this.parsing && this.buf !== null && this.reading) this.parse();
    }
  }

  end() {
    if (this.dead || this.ending) return;
    this.ending = true;
    this.reading = false;
    const socket = this.socket;
    // Once everything is handed to the kernel, a peer that does not close its side within a
    // second is cut (what it has not read yet stays readable on a Unix socket).
    socket.once('finish', () => setTimeout(() => socket.destroy(), 1000).unref());
    socket.end();
  }

  // Called by the plugin's sweep: refuse a request that has taken too long to arrive.
  checkTimeout(now, timeout) {
    if (this.dead || this.started === 0) return;
    if (this.paused) {
      this.started = now; // waiting for us (answers owed), not for the peer
      return;
    }
    if (now - this.started <= timeout) return;
    if (this.fresh) {
      this.socket.destroy(); // never sent a byte: nothing to answer
    } else if (this.reading && (this.state !== H_START || this.buf !== null)) {
      this.started = 0;
      this.refuse(408, 'Request Timeout', 'RequestTimeout', 'the request did not arrive in time');
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The 'http' engine: http.createServer, one ServerResponse per reply.

class HttpReply {
  constructor(res) {
    this.res = res;
    this.done = false;
  }

  get open() {
    return !this.done && !this.res.destroyed && !this.res.writableEnded;
  }

  send(status, reason, body, headers, close) {
    if (!this.open) return;
    this.done = true;
    const h = headers !== null ? { ...headers, 'Content-Length': body.length } : { 'Content-Length': body.length };
    if (close) h.Connection = 'close';
    this.res.sendDate = false;
    this.res.writeHead(status, reason, h);
    this.res.end(body);
  }

  onClose(fn) {
    if (this.res.destroyed || this.res.writableFinished) fn();
    else this.res.once('close', fn);
  }

  abort() {
    if (this.res.socket) this.res.socket.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// The plugin

const REASONS = {
  200: 'OK',
  400: 'Bad Request',
  404: 'Not Found',
  408: 'Request Timeout',
  413: 'Content Too Large',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

class Plugin {
  constructor({
    location,
    name,
    namespace = '',
    url = null,
    lazyLoad = false,
    activator = null,
    stopper = null,
    ...settings
  } = {}) {
    // No location: the directory a launching registry passes in GOPLUG_DIR.
    if (location === null || location === undefined) location = process.env.GOPLUG_DIR || '';
    if (typeof location !== 'string' || location === '') {
      throw new ConfigError('no plugin directory: pass location, or set GOPLUG_DIR (a registry\'s launch() sets it)');
    }
    if (namespace === null || namespace === undefined) namespace = '';
    checkName(name, 'name');
    checkName(namespace, 'namespace');
    for (const k of Object.keys(settings)) {
      if (!(k in DEFAULTS)) throw new ConfigError(`unknown setting ${JSON.stringify(k)}`);
    }
    this.settings = { ...DEFAULTS, ...settings };
    if (this.settings.engine !== 'net' && this.settings.engine !== 'http') {
      throw new ConfigError(`engine must be 'net' or 'http', not ${JSON.stringify(this.settings.engine)}`);
    }
    this.location = path.resolve(location);
    this.name = name;
    this.namespace = namespace;
    this.url = url || `unix://${namespace}${name}`;
    if (/\s/.test(this.url)) throw new ConfigError(`invalid Url ${JSON.stringify(this.url)}: no white space`);
    this.lazyLoad = Boolean(lazyLoad);
    this.activator = activator;
    this.stopper = stopper;
    const stem = namespace ? `${name}@${namespace}` : name;
    this.pconfPath = path.join(this.location, stem + this.settings.confExt);
    this.sockPath = null; // set by start()
    this._wantedSock = path.join(this.location, stem + '.sock');
    this._prefix = urlPath(this.url);
    this._methods = new Map();
    this._subs = null;
    this._server = null;
    this._sockets = new Set(); // every open client socket
    this._connections = new Set(); // NetConnections ('net' engine)
    this._sweeper = null;
    this._stopping = false;
    this._stopPromise = null;
    this._pconfWritten = false;
    this._listening = false;
    this._onExit = () => this._cleanupSync();
  }

  // fn: (Buffer) => Buffer | string | Uint8Array | undefined, or a Promise of one.
  // registerMethod(fn) uses fn.name.
  registerMethod(name, fn) {
    if (typeof name === 'function') [name, fn] = [fn || name.name, name];
    if (typeof fn !== 'function') throw new TypeError('registerMethod needs a function');
    if (typeof name !== 'string' || name === '' || name.includes('/') || CONTROL_RE.test(name)) {
      throw new ConfigError(`invalid method name ${JSON.stringify(name)}`);
    }
    if (RESERVED.has(name)) throw new ConfigError(`${JSON.stringify(name)} is a reserved route name`);
    this._methods.set(name, fn);
    return this;
  }

  // The method names, as /Activate announces them.
  get methods() {
    return [...this._methods.keys()];
  }

  // The names of the callbacks that have at least one subscriber now.
  get callbacks() {
    return this._subs ? this._subs.names() : [];
  }

  // True between start() (once announced) and stop().
  get running() {
    return this._pconfWritten && !this._stopping;
  }

  // "name@namespace" (or "name"), for messages.
  get label() {
    return this.namespace ? `${this.name}@${this.namespace}` : this.name;
  }

  // Queue data for every subscriber of the callback `name`. Resolves with the number of
  // subscribers; rejects with code CALLBACK_NOT_FOUND when there is none, NOTIFY_TIMEOUT when a
  // subscriber's queue stays full for the notify timeout. The data must not be changed after.
  notify(name, data) {
    if (!this._subs) return Promise.reject(new CallbackNotFound(name));
    let buf;
    try {
      buf = toBuffer(data, 'notify data');
    } catch (err) {
      return Promise.reject(err);
    }
    return this._subs.notify(name, buf);
  }

  // Listen, then announce: resolves with the path of the .pconf once both are done.
  async start() {
    if (this._server) throw new GoPlugError('the plugin is already started', 'ALREADY_STARTED');
    const s = this.settings;
    const created = fs.mkdirSync(this.location, { recursive: true, mode: 0o700 });
    if (created) fs.chmodSync(this.location, 0o700);
    this.sockPath = this._socketPath();
    await this._clearStaleSocket(this.sockPath);

    const server = s.engine === 'net' ? this._netServer() : this._httpServer();
    server.on('error', (err) => process.stderr.write(`goplug: server error: ${err.stack || err}\n`));
    this._server = server;
    this._subs = new SubscriptionTable(this, s);

    // Listen with a umask that keeps the socket 0600 from its first instant, then make sure.
    try {
      await new Promise((resolve, reject) => {
        const onError = (err) => {
          server.removeListener('listening', onListening);
          reject(err.code === 'EADDRINUSE' ? new PluginAlreadyRunning(`${this.sockPath} is in use: ${err.message}`) : err);
        };
        const onListening = () => {
          server.removeListener('error', onError);
          resolve();
        };
        server.once('error', onError);
        server.once('listening', onListening);
        const old = process.umask(0o177);
        try {
          server.listen(this.sockPath);
        } finally {
          process.umask(old);
        }
      });
    } catch (err) {
      this._server = null;
      this._subs.stop();
      this._subs = null;
      throw err;
    }
    this._listening = true;
    process.on('exit', this._onExit);
    fs.chmodSync(this.sockPath, 0o600);
    if (s.engine === 'net') {
      const every = Math.max(20, Math.min(1000, Math.floor(s.requestTimeout / 4)));
      this._sweeper = setInterval(() => {
        const now = Date.now();
        for (const c of this._connections) c.checkTimeout(now, s.requestTimeout);
      }, every);
      this._sweeper.unref();
    }
    try {
      this._writePconf();
    } catch (err) {
      await this.stop(); // no announcement: no server either
      throw err;
    }
    return this.pconfPath;
  }

  // Stop: remove the .pconf, answer the waiting polls (503), stop listening, let the calls in
  // progress answer (with Connection: close) for up to stopGrace ms, remove the socket.
  stop() {
    if (this._stopPromise) return this._stopPromise;
    this._stopPromise = (async () => {
      this._stopping = true;
      if (this._pconfWritten) {
        this._pconfWritten = false;
        try {
          unlinkQuiet(this.pconfPath);
        } catch (err) {
          process.stderr.write(`goplug: cannot remove ${this.pconfPath}: ${err.message}\n`);
        }
      }
      if (this._subs) this._subs.stop();
      clearInterval(this._sweeper);
      const server = this._server;
      if (server && this._listening) {
        await new Promise((resolve) => {
          const grace = setTimeout(() => {
            for (const sock of this._sockets) sock.destroy();
          }, this.settings.stopGrace);
          server.close(() => {
            clearTimeout(grace);
            resolve();
          });
          // Idle connections go now; busy ones after their answers.
          if (this.settings.engine === 'net') {
            for (const c of [...this._connections]) {
              if (c.replies.length === 0) c.socket.destroy();
            }
          } else {
            for (const sock of this._sockets) {
              if (!sock._httpMessage) sock.destroy();
            }
          }
        });
        this._listening = false;
        try {
          unlinkQuiet(this.sockPath);
        } catch (err) {
          process.stderr.write(`goplug: cannot remove ${this.sockPath}: ${err.message}\n`);
        }
      }
      process.removeListener('exit', this._onExit);
    })();
    return this._stopPromise;
  }

  // Stop cleanly and exit 0 on SIGINT and SIGTERM (exit 1 if stopping fails).
  stopOnSignals(signals = ['SIGINT', 'SIGTERM']) {
    let seen = false;
    const handler = (sig) => {
      if (seen) return;
      seen = true;
      const force = setTimeout(() => {
        this._cleanupSync();
        process.exit(1);
      }, this.settings.stopGrace + 3000);
      force.unref();
      this.stop().then(
        () => process.exit(0),
        (err) => {
          process.stderr.write(`goplug: stop on ${sig} failed: ${err.stack || err}\n`);
          process.exit(1);
        },
      );
    };
    for (const sig of signals) process.on(sig, handler);
    return this;
  }

  // -- start-up helpers ------------------------------------------------------------------------

  _socketPath() {
    const wanted = this._wantedSock;
    if (Buffer.byteLength(wanted) <= MAX_SOCK_PATH) return wanted;
    // Too long for a socket address: a private directory under $TMPDIR instead.
    const dir = path.resolve(process.env.TMPDIR || os.tmpdir(), `goplug-${process.getuid()}`);
    try {
      fs.mkdirSync(dir, { mode: 0o700 });
    } catch (err) {
      if (err.code !== 'EEXIST') throw err;
    }
    const st = fs.lstatSync(dir);
    if (!st.isDirectory() || st.uid !== process.getuid() || (st.mode & 0o077) !== 0) {
      throw new ConfigError(`${dir} must be a directory of uid ${process.getuid()} with mode 0700`);
    }
    const digest = crypto.createHash('sha256').update(wanted, 'utf8').digest('hex').slice(0, 24);
    const sock = path.join(dir, digest + '.sock');
    if (Buffer.byteLength(sock) > MAX_SOCK_PATH) throw new ConfigError(`socket path ${sock} is too long`);
    return sock;
  }

  // If the socket path exists: refuse to start when someone answers on it, else remove it.
  async _clearStaleSocket(p) {
    let st;
    try {
      st = fs.lstatSync(p);
    } catch (err) {
      if (err.code === 'ENOENT') return;
      throw err;
    }
    if (!st.isSocket()) throw new ConfigError(`${p} exists and is not a socket`);
    const alive = await new Promise((resolve, reject) => {
      const c = net.connect(p);
      const timer = setTimeout(() => {
        c.destroy();
        resolve(true); // neither accepted nor refused: do not take it over
      }, 2000);
      c.once('connect', () => {
        clearTimeout(timer);
        c.destroy();
        resolve(true);
      });
      c.once('error', (err) => {
        clearTimeout(timer);
        if (err.code === 'ECONNREFUSED' || err.code === 'ENOENT') resolve(false);
        else if (err.code === 'EAGAIN') resolve(true);
        else reject(err);
      });
    });
    if (alive) {
      const who = this.namespace ? `${this.name}@${this.namespace}` : this.name;
      throw new PluginAlreadyRunning(`another process is already listening on ${p}: refusing to start ${who}`);
    }
    unlinkQuiet(p);
  }

  // Write the .pconf atomically: a temporary file in the same directory, renamed into place.
  _writePconf() {
    const conf = {
      Name: this.name,
      NameSpace: this.namespace,
      Url: this.url,
      Sock: this.sockPath,
      LazyLoad: this.lazyLoad,
      Pid: process.pid,
      Protocol: PROTOCOL_VERSION,
      Version: VERSION,
    };
    // Started by a registry's launch(): echo its token so that it knows this process.
    const token = process.env.GOPLUG_LAUNCH_TOKEN || '';
    if (/^[A-Za-z0-9_-]{1,64}$/.test(token)) conf.Launch = token;
    const data = Buffer.from(JSON.stringify(conf), 'utf8');
    const base = path.basename(this.pconfPath);
    const tmp = path.join(this.location, `.${base}.${process.pid}.${crypto.randomBytes(6).toString('hex')}.tmp`);
    const fd = fs.openSync(tmp, 'wx', 0o600);
    try {
      fs.fchmodSync(fd, 0o600);
      fs.writeSync(fd, data);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      fs.renameSync(tmp, this.pconfPath);
    } catch (err) {
      try {
        fs.closeSync(fd);
      } catch (_) {
        // already closed
      }
      unlinkQuiet(tmp);
      throw err;
    }
    this._pconfWritten = true;
  }

  // Last-chance cleanup when the process exits without stop().
  _cleanupSync() {
    try {
      if (this._pconfWritten) unlinkQuiet(this.pconfPath);
      this._pconfWritten = false;
      if (this._listening) unlinkQuiet(this.sockPath);
    } catch (_) {
      // exiting anyway
    }
  }

  // -- servers ---------------------------------------------------------------------------------

  // Count a new connection; refuse it with 503 when there are too many or the plugin is stopping.
  // (PROTOCOL.md §7's peer-credential check needs SO_PEERCRED, which Node's standard library
  // does not offer: the socket's mode 0600 is the access control here.)
  _admit(socket) {
    this._sockets.add(socket);
    socket.once('close', () => this._sockets.delete(socket));
    if (!this._stopping && this._sockets.size <= this.settings.maxConnections) return true;
    socket._goplugRejected = true;
    const [type, message] = this._stopping
      ? ['Stopping', 'the plugin is stopping']
      : ['ServiceUnavailable', `too many connections (the limit is ${this.settings.maxConnections})`];
    const body = errorBody(type, message, '');
    socket.on('error', () => socket.destroy());
    socket.resume(); // read and drop what it sends, to see its end
    socket.end(`HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
    setTimeout(() => socket.destroy(), 1000).unref();
    return false;
  }

  _netServer() {
    return net.createServer({ allowHalfOpen: true, pauseOnConnect: false }, (socket) => {
      if (!this._admit(socket)) return;
      this._connections.add(new NetConnection(this, socket));
    });
  }

  _httpServer() {
    const s = this.settings;
    const server = http.createServer({
      maxHeaderSize: s.maxHeadBytes,
      headersTimeout: s.requestTimeout,
      requestTimeout: s.requestTimeout,
      connectionsCheckingInterval: Math.max(20, Math.min(1000, Math.floor(s.requestTimeout / 4))),
      keepAliveTimeout: 0,
      requireHostHeader: false, // the Host header carries nothing a plugin needs
    });
    server.keepAliveTimeout = 0; // never close an idle persistent connection
    server.timeout = 0;
    server.maxHeadersCount = s.maxHeaderLines + 1; // one more, to see when there are too many
    server.maxRequestsPerSocket = 0;
    server.on('connection', (socket) => this._admit(socket));
    server.on('request', (req, res) => this._onHttpRequest(req, res, false));
    server.on('checkContinue', (req, res) => this._onHttpRequest(req, res, true));
    server.on('checkExpectation', (req, res) => this._onHttpRequest(req, res, false));
    server.on('clientError', (err, socket) => this._onHttpClientError(err, socket));
    return server;
  }

  _onHttpClientError(err, socket) {
    const busy = socket._httpMessage && socket._httpMessage._headerSent;
    if (err.code === 'ECONNRESET' || !socket.writable || socket._goplugRejected || busy) {
      socket.destroy();
      return;
    }
    if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT' && socket.bytesRead === 0) {
      socket.destroy(); // never sent a byte: nothing to answer
      return;
    }
    let head = 'HTTP/1.1 400 Bad Request';
    let body;
    if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT') {
      head = 'HTTP/1.1 408 Request Timeout';
      body = errorBody('RequestTimeout', 'the request did not arrive in time', '');
    } else if (err.code === 'HPE_HEADER_OVERFLOW') {
      body = errorBody('ProtocolError', `the request head exceeds ${this.settings.maxHeadBytes} bytes`, '');
    } else {
      body = errorBody('ProtocolError', `malformed request: ${err.reason || err.message}`, '');
    }
    socket.end(`${head}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
    setTimeout(() => socket.destroy(), 1000).unref();
  }

  _onHttpRequest(req, res, expectsContinue) {
    if (req.socket._goplugRejected) return;
    const reply = new HttpReply(res);
    const s = this.settings;
    if (req.rawHeaders.length > 2 * s.maxHeaderLines) {
      this._sendError(reply, 400, 'ProtocolError', `more than ${s.maxHeaderLines} header lines`, true);
      return;
    }
    const dispatch = (body) => {
      this._handle(req.url, reply, req.headers['x-goplug-subscriber'] ?? null, req.headers['x-goplug-ack'] ?? null, body);
    };
    const cl = req.headers['content-length'];
    if (cl !== undefined) {
      const n = Number(cl);
      if (n > s.maxBody) {
        // Refused from the announced length, before reading: answer and close.
        this._sendError(reply, 413, 'ProtocolError', `the body (${n} bytes) exceeds the limit of ${s.maxBody} bytes`, true);
        return;
      }
      if (expectsContinue) res.writeContinue();
      if (n === 0) {
        req.resume();
        req.once('end', () => dispatch(EMPTY));
        return;
      }
      const body = Buffer.allocUnsafe(n);
      let off = 0;
      req.on('data', (chunk) => {
        chunk.copy(body, off);
        off += chunk.length;
      });
      req.once('end', () => {
        if (off === n) dispatch(body);
      });
      return;
    }
    if (expectsContinue) res.writeContinue();
    // Chunked (or no) body: counted as it comes.
    const chunks = [];
    let size = 0;
    let refused = false;
    req.on('data', (chunk) => {
      if (refused) return;
      size += chunk.length;
      if (size > s.maxBody) {
        refused = true;
        chunks.length = 0;
        this._sendError(reply, 413, 'ProtocolError', `the body exceeds the limit of ${s.maxBody} bytes`, true);
        req.socket.destroySoon();
        return;
      }
      chunks.push(chunk);
    });
    req.once('end', () => {
      if (!refused) dispatch(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size));
    });
  }

  // -- answering -------------------------------------------------------------------------------

  _send(reply, status, body, headers, close = false) {
    reply.send(status, REASONS[status] || http.STATUS_CODES[status] || 'Unknown', body, headers, close || this._stopping);
  }

  _sendError(reply, status, type, message, close, traceback = '') {
    this._send(reply, status, errorBody(type, message, traceback), { 'Content-Type': 'application/json' }, close);
  }

  _fail(reply, err) {
    const d = describeError(err);
    this._sendError(reply, 500, d.type, d.message, false, d.traceback);
  }

  // One complete request, from either engine.
  _handle(target, reply, subscriber, ack, body) {
    if (this._stopping) {
      this._sendError(reply, 503, 'Stopping', 'the plugin is stopping', true);
      return;
    }
    const route = routeOf(target, this._prefix);
    if (route === null) {
      this._sendError(reply, 400, 'ProtocolError', `malformed request target ${JSON.stringify(target.slice(0, 100))}`, false);
      return;
    }
    const fn = this._methods.get(route);
    if (fn !== undefined) {
      this._call(reply, fn, body, route);
      return;
    }
    switch (route) {
      case 'Ping':
        this._send(reply, 200, body, null);
        return;
      case 'Activate':
        this._activate(reply, body);
        return;
      case 'RegisterCallback':
      case 'Unsubscribe':
        this._callbackRoute(route, reply, subscriber, ack, body);
        return;
      case 'Stop':
        this._call(reply, this.stopper, body, 'the stopper');
        return;
      case '':
        this._sendError(reply, 400, 'ProtocolError', 'empty route', false);
        return;
      default:
        this._sendError(reply, 404, 'MethodNotFound', `the plugin has no method ${JSON.stringify(route)}`, false);
    }
  }

  _call(reply, fn, body, what) {
    if (!fn) {
      this._send(reply, 200, EMPTY, null);
      return;
    }
    let out;
    try {
      out = fn(body);
    } catch (err) {
      this._fail(reply, err);
      return;
    }
    if (out !== null && typeof out === 'object' && typeof out.then === 'function') {
      out.then(
        (v) => this._result(reply, v, what),
        (err) => this._fail(reply, err),
      );
    } else {
      this._result(reply, out, what);
    }
  }

  _result(reply, value, what) {
    let buf;
    try {
      buf = toBuffer(value, what);
    } catch (err) {
      this._fail(reply, err);
      return;
    }
    this._send(reply, 200, buf, null);
  }

  async _activate(reply, body) {
    const list = Buffer.from(JSON.stringify(this.methods), 'utf8');
    let extra = EMPTY;
    if (this.activator) {
      try {
        extra = toBuffer(await this.activator(body), 'the activator');
      } catch (err) {
        this._fail(reply, err);
        return;
      }
    }
    this._send(reply, 200, extra.length ? Buffer.concat([list, extra]) : list, null);
  }

  _callbackRoute(route, reply, subscriber, rawAck, body) {
    let name;
    try {
      name = JSON.parse(body.toString('utf8'));
    } catch (_) {
      name = null;
    }
    if (typeof name !== 'string' || name === '') {
      this._sendError(reply, 400, 'ProtocolError', `/${route}: the body must be the callback's name as a non-empty JSON string`, false);
      return;
    }
    const token = subscriber === null || subscriber === '' ? null : subscriber;
    if (token !== null && !SUBSCRIBER_RE.test(token)) {
      this._sendError(reply, 400, 'ProtocolError', 'X-Goplug-Subscriber must be 1-64 characters of A-Za-z0-9_-', false);
      return;
    }
    if (route === 'Unsubscribe') {
      this._subs.unsubscribe(name, token);
      this._send(reply, 200, EMPTY, null);
      return;
    }
    let ack = 0;
    if (token !== null && rawAck !== null) {
      const t = rawAck.trim();
      if (!ACK_RE.test(t)) {
        this._sendError(reply, 400, 'ProtocolError', 'X-Goplug-Ack must be a non-negative integer', false);
        return;
      }
      ack = Number(t);
    }
    this._subs.poll(reply, name, token, ack);
  }
}

module.exports = {
  Plugin,
  GoPlugError,
  ConfigError,
  PluginAlreadyRunning,
  CallbackNotFound,
  NotifyTimeout,
  PluginStopped,
  PROTOCOL_VERSION,
  VERSION,
  RESERVED,
  routeOf,
};
