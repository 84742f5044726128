'use strict';
// The goplug Node.js library against raw HTTP/1.1 over real Unix sockets, for both engines.
// Every test has a timeout, every wait has one, and every plugin, connection and temporary
// directory is ended or removed after its test, pass or fail.

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { describe, test } = require('node:test');

const goplug = require('..');
const { EMPTY, RawClient, records, startPlugin, tempDir, waitFor, withTimeout } = require('../test-helpers/raw');

const { Plugin } = goplug;
const T = { timeout: 20000 };
const ALL_BYTES = Buffer.from(Array.from({ length: 256 }, (_, i) => i));

// The launch handshake variables must be the test's own choice.
delete process.env.GOPLUG_DIR;
delete process.env.GOPLUG_LAUNCH_TOKEN;

function withEnv(t, vars) {
  const saved = {};
  for (const [k, v] of Object.entries(vars)) {
    saved[k] = process.env[k];
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  t.after(() => {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  });
}

function methods(plugin) {
  plugin.registerMethod('Echo', (input) => input);
  plugin.registerMethod('Reverse', (input) => Buffer.from(input).reverse());
  plugin.registerMethod(async function Later(input) {
    await new Promise((resolve) => setTimeout(resolve, 5));
    return Buffer.concat([Buffer.from('later:'), input]);
  });
  plugin.registerMethod('Text', (input) => `${input.length} bytes`);
  plugin.registerMethod('Fail', () => {
    throw new TypeError('deliberate failure');
  });
  plugin.registerMethod('FailLater', async () => {
    throw new RangeError('deliberate async failure');
  });
}

async function echoPlugin(t, engine, options = {}) {
  const dir = tempDir(t);
  const plugin = await startPlugin(t, { location: dir, engine, ...options }, methods);
  return { dir, plugin };
}

function assertJsonError(res, status, type, messagePart) {
  assert.equal(res.status, status);
  assert.equal(res.headers['content-type'], 'application/json');
  const err = res.json();
  assert.equal(err.type, type);
  assert.match(err.message, messagePart);
  assert.equal(typeof err.traceback, 'string');
  return err;
}

function reliable(token, ack) {
  return { 'X-Goplug-Subscriber': token, 'X-Goplug-Ack': String(ack) };
}

const json = (s) => JSON.stringify(s);

function isSocket(p) {
  try {
    return fs.lstatSync(p).isSocket();
  } catch (_) {
    return false;
  }
}

// The names a directory holds, sorted.
const ls = (dir) => fs.readdirSync(dir).sort();

for (const engine of ['net', 'http']) {
  describe(`engine ${engine}`, () => {
    test('announces itself after listening: an atomic .pconf, mode 0600', T, async (t) => {
      const dir = tempDir(t);
      const pconf = path.join(dir, 'Echo@Node.pconf');
      const sock = path.join(dir, 'Echo@Node.sock');
      const seen = [];
      const watcher = fs.watch(dir, (event, file) => {
        // When the .pconf appears, the socket already listens.
        if (file === 'Echo@Node.pconf' && fs.existsSync(pconf)) seen.push([event, isSocket(sock)]);
        else seen.push([event, file]);
      });
      t.after(() => watcher.close());
      const plugin = await startPlugin(t, { location: dir, engine }, methods);
      assert.equal(plugin.pconfPath, pconf);
      assert.equal(plugin.sockPath, sock);
      assert.equal(plugin.running, true);
      await waitFor(() => seen.some(([, x]) => x === true), 3000, 'the .pconf to appear');
      // Written elsewhere and renamed into place: never modified under its own name.
      assert.ok(!seen.some(([event, x]) => event === 'change' && (x === true || x === false)), json(seen));
      assert.deepEqual(ls(dir), ['Echo@Node.pconf', 'Echo@Node.sock']); // no temporary file left
      assert.equal(fs.statSync(pconf).mode & 0o777, 0o600);
      assert.equal(fs.statSync(sock).mode & 0o777, 0o600);
      const conf = JSON.parse(fs.readFileSync(pconf, 'utf8'));
      assert.deepEqual(conf, {
        Name: 'Echo',
        NameSpace: 'Node',
        Url: 'unix://NodeEcho',
        Sock: sock,
        LazyLoad: false,
        Pid: process.pid,
        Protocol: 'goplug/1',
        Version: require('../package.json').version,
      });
    });

    test('/Activate lists the methods; the activator output follows', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      const c = await RawClient.open(t, plugin.sockPath);
      const res = await c.request('/Activate');
      assert.equal(res.status, 200);
      assert.equal(res.reason, 'OK');
      assert.deepEqual(res.json(), ['Echo', 'Reverse', 'Later', 'Text', 'Fail', 'FailLater']);
      assert.deepEqual(plugin.methods, res.json());

      const dir2 = tempDir(t);
      const seen = [];
      const other = await startPlugin(t, {
        location: dir2,
        name: 'Act',
        namespace: '',
        engine,
        activator: (input) => {
          seen.push(input.toString());
          return '{"extra":1}';
        },
      }, (p) => p.registerMethod('One', () => '1'));
      assert.ok(fs.existsSync(path.join(dir2, 'Act.pconf')));
      const c2 = await RawClient.open(t, other.sockPath);
      const res2 = await c2.request('/Activate', 'hello');
      assert.equal(res2.body.toString(), '["One"]{"extra":1}');
      assert.deepEqual(seen, ['hello']);
    });

    test('/Ping answers its body', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      const c = await RawClient.open(t, plugin.sockPath);
      assert.equal((await c.request('/Ping', 'Test Data')).body.toString(), 'Test Data');
      const empty = await c.request('/Ping');
      assert.equal(empty.status, 200);
      assert.equal(empty.headers['content-length'], '0');
      assert.equal(empty.body.length, 0);
    });

    test('methods take and give binary bodies: all 256 byte values, empty, large, async', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      const c = await RawClient.open(t, plugin.sockPath);
      const echo = await c.request('/Echo', ALL_BYTES);
      assert.equal(echo.status, 200);
      assert.equal(echo.headers['content-length'], '256');
      assert.deepEqual(echo.body, ALL_BYTES);
      assert.deepEqual((await c.request('/Reverse', ALL_BYTES)).body, Buffer.from(ALL_BYTES).reverse());
      const empty = await c.request('/Echo', EMPTY);
      assert.equal(empty.status, 200);
      assert.equal(empty.headers['content-length'], '0');
      assert.deepEqual(empty.body, EMPTY);
      const later = await c.request('/Later', ALL_BYTES);
      assert.deepEqual(later.body, Buffer.concat([Buffer.from('later:'), ALL_BYTES]));
      assert.equal((await c.request('/Text', 'abc')).body.toString(), '3 bytes');
      const big = crypto.randomBytes(3 * 1024 * 1024 + 7);
      assert.ok((await c.request('/Echo', big, {}, 10000)).body.equals(big));
      // The route is the first %-decoded path segment; the rest and a query are ignored.
      assert.deepEqual((await c.request('/%45cho/x?y=1', 'q')).body.toString(), 'q');
    });

    test('pipelined and chunked requests are answered in order', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      const c = await RawClient.open(t, plugin.sockPath);
      const parts = [];
      for (let i = 0; i < 20; i++) {
        const body = Buffer.from(`call ${i}`);
        parts.push(Buffer.from(`POST /${i % 2 ? 'Later' : 'Echo'} HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\n\r\n`), body);
      }
      parts.push(Buffer.from('POST /Echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'));
      parts.push(Buffer.from('3\r\n\x00\x01\x02\r\n1\r\n\xff\r\n0\r\n\r\n', 'latin1'));
      c.write(Buffer.concat(parts));
      for (let i = 0; i < 20; i++) {
        const res = await c.response(5000, `answer ${i}`);
        assert.equal(res.body.toString(), `${i % 2 ? 'later:' : ''}call ${i}`);
      }
      assert.deepEqual((await c.response()).body, Buffer.from([0, 1, 2, 255]));
    });

    test('an unknown method is a 404 with a JSON error; the connection stays usable', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      const c = await RawClient.open(t, plugin.sockPath);
      assertJsonError(await c.request('/Missing', 'x'), 404, 'MethodNotFound', /Missing/);
      assertJsonError(await c.request('/echo'), 404, 'MethodNotFound', /echo/); // case-sensitive
      assertJsonError(await c.request('/'), 400, 'ProtocolError', /empty route/);
      assert.equal((await c.request('/Echo', 'still here')).body.toString(), 'still here');
    });

    test('a failing method is a 500 with a JSON error body', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      const c = await RawClient.open(t, plugin.sockPath);
      const err = assertJsonError(await c.request('/Fail', 'x'), 500, 'TypeError', /^deliberate failure$/);
      assert.match(err.traceback, /TypeError: deliberate failure\n\s+at /);
      const err2 = assertJsonError(await c.request('/FailLater'), 500, 'RangeError', /^deliberate async failure$/);
      assert.match(err2.traceback, /RangeError/);
      assert.equal((await c.request('/Echo', 'ok')).body.toString(), 'ok');
    });

    test('a long poll without subscriber headers gets one raw notification per answer', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      await assert.rejects(plugin.notify('news', 'nobody'), { code: 'CALLBACK_NOT_FOUND' });
      const poller = await RawClient.open(t, plugin.sockPath);
      poller.send('/RegisterCallback', json('news'));
      await waitFor(() => plugin.callbacks.includes('news'), 3000, 'the poll to arrive');
      assert.deepEqual(plugin.callbacks, ['news']);
      assert.equal(await withTimeout(plugin.notify('news', ALL_BYTES), 3000, 'notify'), 1);
      const first = await poller.response(3000, 'the first notification');
      assert.equal(first.status, 200);
      assert.deepEqual(first.body, ALL_BYTES);
      assert.equal(first.headers['x-goplug-seq'], undefined);
      // Queued while no poll waits, then answered at once, one per poll, in order.
      assert.equal(await plugin.notify('news', 'two'), 1);
      assert.equal(await plugin.notify('news', ''), 1);
      assert.equal((await poller.request('/RegisterCallback', json('news'))).body.toString(), 'two');
      const third = await poller.request('/RegisterCallback', json('news'));
      assert.equal(third.status, 200);
      assert.equal(third.body.length, 0);
      // Calls go on other connections while a poll waits.
      poller.send('/RegisterCallback', json('news'));
      const caller = await RawClient.open(t, plugin.sockPath);
      assert.equal((await caller.request('/Echo', 'meanwhile')).body.toString(), 'meanwhile');
      assertJsonError(await caller.request('/RegisterCallback', 'not json'), 400, 'ProtocolError', /JSON string/);
    });

    test('a long poll with subscriber headers gets numbered batches, again until acknowledged', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      const c = await RawClient.open(t, plugin.sockPath);
      c.send('/RegisterCallback', json('ev'), reliable('sub-1', 0));
      await waitFor(() => plugin.callbacks.includes('ev'), 3000, 'the poll to arrive');
      // Notifications made together go in one answer.
      const done = [plugin.notify('ev', 'a'), plugin.notify('ev', ALL_BYTES), plugin.notify('ev', '')];
      assert.deepEqual(await withTimeout(Promise.all(done), 3000, 'notify'), [1, 1, 1]);
      const batch = await c.response(3000, 'the first batch');
      assert.equal(batch.status, 200);
      assert.equal(batch.headers['x-goplug-seq'], '1');
      assert.equal(batch.headers['x-goplug-count'], '3');
      assert.deepEqual(records(batch.body), [Buffer.from('a'), ALL_BYTES, EMPTY]);
      // Acknowledging only 1: 2 and 3 come again (an answer lost on a cut connection).
      const again = await c.request('/RegisterCallback', json('ev'), reliable('sub-1', 1));
      assert.equal(again.headers['x-goplug-seq'], '2');
      assert.deepEqual(records(again.body), [ALL_BYTES, EMPTY]);
      // All acknowledged: the next poll waits for the next notification.
      c.send('/RegisterCallback', json('ev'), reliable('sub-1', 3));
      await assert.rejects(c.response(200, 'nothing'), /timed out/);
      await plugin.notify('ev', 'd');
      const next = await c.response(3000, 'the next batch');
      assert.equal(next.headers['x-goplug-seq'], '4');
      assert.equal(next.headers['x-goplug-count'], '1');
      assert.deepEqual(records(next.body), [Buffer.from('d')]);
      assertJsonError(await c.request('/RegisterCallback', json('ev'), reliable('bad token!', 0)), 400, 'ProtocolError', /Subscriber/);
      assertJsonError(await c.request('/RegisterCallback', json('ev'), reliable('sub-1', 'x')), 400, 'ProtocolError', /Ack/);
    });

    test('notifications reach every subscriber exactly once, in order, with back-pressure', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine, { queueSize: 8 });
      const N = 300;
      const consume = async (token) => {
        const c = await RawClient.open(t, plugin.sockPath);
        const got = [];
        let ack = 0;
        while (got.length < N) {
          const res = await c.request('/RegisterCallback', json('seq'), reliable(token, ack), 5000);
          assert.equal(res.status, 200);
          const seq = Number(res.headers['x-goplug-seq']);
          const items = records(res.body);
          assert.equal(seq, ack + 1, 'no gap, no repeat');
          got.push(...items.map((b) => b.toString()));
          ack = seq + items.length - 1;
        }
        return got;
      };
      const legacy = (async () => {
        const c = await RawClient.open(t, plugin.sockPath);
        const got = [];
        while (got.length < N) got.push((await c.request('/RegisterCallback', json('seq'), {}, 5000)).body.toString());
        return got;
      })();
      const consumers = [consume('s1'), consume('s2'), legacy];
      await waitFor(() => plugin._subs.byName.get('seq')?.size === 3, 3000, 'three subscribers');
      // Fired all at once: queues of 8 make most of them wait for room, in call order.
      const counts = await withTimeout(Promise.all(Array.from({ length: N }, (_, i) => plugin.notify('seq', String(i)))), 15000, 'every notify');
      assert.ok(counts.every((n) => n === 3));
      const want = Array.from({ length: N }, (_, i) => String(i));
      for (const got of await withTimeout(Promise.all(consumers), 15000, 'the consumers')) assert.deepEqual(got, want);
    });

    test('notify fails with NOTIFY_TIMEOUT when a queue stays full', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine, { queueSize: 1, notifyTimeout: 150 });
      const c = await RawClient.open(t, plugin.sockPath);
      c.send('/RegisterCallback', json('slow'), reliable('s', 0));
      await waitFor(() => plugin.callbacks.includes('slow'), 3000, 'the poll');
      await plugin.notify('slow', 'one'); // queued (and sent) but never acknowledged
      await assert.rejects(withTimeout(plugin.notify('slow', 'two'), 3000, 'notify'), (err) => {
        assert.ok(err instanceof goplug.NotifyTimeout);
        assert.equal(err.code, 'NOTIFY_TIMEOUT');
        return true;
      });
    });

    test('/Unsubscribe ends a subscriber for good', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      const poller = await RawClient.open(t, plugin.sockPath);
      poller.send('/RegisterCallback', json('news'), reliable('gone', 0));
      const other = await RawClient.open(t, plugin.sockPath);
      other.send('/RegisterCallback', json('news'), reliable('stays', 0));
      await waitFor(() => plugin._subs.byName.get('news')?.size === 2, 3000, 'both polls');
      const c = await RawClient.open(t, plugin.sockPath);
      const res = await c.request('/Unsubscribe', json('news'), reliable('gone', 0));
      assert.equal(res.status, 200);
      assert.equal(res.body.length, 0);
      // Its waiting poll ends without an answer.
      await poller.closed(3000);
      assert.equal(poller.ready.length, 0);
      assert.equal(await plugin.notify('news', 'x'), 1);
      assert.deepEqual(records((await other.response(3000)).body), [Buffer.from('x')]);
      // A poll carrying the ended token, read later, is not answered and does not revive it.
      const late = await RawClient.open(t, plugin.sockPath);
      late.send('/RegisterCallback', json('news'), reliable('gone', 0));
      await late.closed(3000);
      assert.equal(late.ready.length, 0);
      await c.request('/Unsubscribe', json('news'), reliable('stays', 1));
      assert.deepEqual(plugin.callbacks, []);
      await assert.rejects(plugin.notify('news', 'y'), { code: 'CALLBACK_NOT_FOUND' });
    });

    test('stop answers waiting polls 503, removes the .pconf, then the socket', T, async (t) => {
      const { dir, plugin } = await echoPlugin(t, engine);
      const poller = await RawClient.open(t, plugin.sockPath);
      poller.send('/RegisterCallback', json('news'), reliable('s', 0));
      await waitFor(() => plugin.callbacks.length === 1, 3000, 'the poll');
      const removed = [];
      const watcher = fs.watch(dir, (event, file) => {
        if (event === 'rename' && file && !fs.existsSync(path.join(dir, file))) removed.push(file);
      });
      t.after(() => watcher.close());
      await withTimeout(plugin.stop(), 5000, 'stop');
      assert.equal(plugin.running, false);
      assertJsonError(await poller.response(3000), 503, 'Stopping', /stopping/);
      await poller.closed(3000);
      assert.deepEqual(ls(dir), []);
      await waitFor(() => removed.length >= 2, 3000, 'both removals to be seen');
      assert.deepEqual(removed.slice(0, 2), ['Echo@Node.pconf', 'Echo@Node.sock']);
      await assert.rejects(RawClient.open(t, path.join(dir, 'Echo@Node.sock'), 1000), { code: 'ENOENT' });
      await plugin.stop(); // stopping twice is harmless
    });

    test('a request arriving too slowly is a 408; a long poll is not a slow request', T, async (t) => {
      const { plugin } = await echoPlugin(t, engine, { requestTimeout: 300 });
      const poller = await RawClient.open(t, plugin.sockPath);
      poller.send('/RegisterCallback', json('late'), reliable('s', 0));
      const slow = await RawClient.open(t, plugin.sockPath);
      slow.write('POST /Echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc');
      assertJsonError(await slow.response(5000), 408, 'RequestTimeout', /in time/);
      await slow.closed(3000);
      await new Promise((resolve) => setTimeout(resolve, 700)); // over twice the request timeout
      await plugin.notify('late', 'still waiting');
      assert.deepEqual(records((await poller.response(3000)).body), [Buffer.from('still waiting')]);
    });

    test("Node's own http client can call it", T, async (t) => {
      const { plugin } = await echoPlugin(t, engine);
      const agent = new http.Agent({ keepAlive: true });
      t.after(() => agent.destroy());
      const call = (route, body) =>
        withTimeout(
          new Promise((resolve, reject) => {
            const req = http.request({ socketPath: plugin.sockPath, path: `/${route}`, method: 'POST', agent }, (res) => {
              const parts = [];
              res.on('data', (d) => parts.push(d));
              res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(parts) }));
              res.on('error', reject);
            });
            req.on('error', reject);
            req.end(body);
          }),
          5000,
          `http ${route}`,
        );
      for (let i = 0; i < 3; i++) assert.deepEqual((await call('Reverse', ALL_BYTES)).body, Buffer.from(ALL_BYTES).reverse());
      assert.equal((await call('Nope', 'x')).status, 404);
    });

    test('GOPLUG_DIR is the directory when no location is given; GOPLUG_LAUNCH_TOKEN is echoed', T, async (t) => {
      const dir = tempDir(t);
      withEnv(t, { GOPLUG_DIR: dir, GOPLUG_LAUNCH_TOKEN: 'q9Jx3kV0mW7cY2bN8aR5tL1e' });
      const plugin = await startPlugin(t, { engine }, methods);
      assert.equal(plugin.location, dir);
      const conf = JSON.parse(fs.readFileSync(path.join(dir, 'Echo@Node.pconf'), 'utf8'));
      assert.equal(conf.Launch, 'q9Jx3kV0mW7cY2bN8aR5tL1e');
      assert.equal(conf.Sock, path.join(dir, 'Echo@Node.sock'));
      const c = await RawClient.open(t, plugin.sockPath);
      assert.equal((await c.request('/Echo', 'launched')).body.toString(), 'launched');
      // An explicit location wins over GOPLUG_DIR.
      const dir2 = tempDir(t);
      const p2 = await startPlugin(t, { location: dir2, name: 'Two', namespace: '', engine });
      assert.equal(p2.location, dir2);
      assert.deepEqual(ls(dir2), ['Two.pconf', 'Two.sock']);
    });

    test('a malformed launch token is not echoed; no directory at all is a ConfigError', T, async (t) => {
      const dir = tempDir(t);
      for (const bad of ['has space', 'x'.repeat(65), 'semi;colon', '']) {
        withEnv(t, { GOPLUG_DIR: dir, GOPLUG_LAUNCH_TOKEN: bad });
        const plugin = new Plugin({ name: 'Tok', engine });
        await withTimeout(plugin.start(), 5000, 'start');
        try {
          const conf = JSON.parse(fs.readFileSync(plugin.pconfPath, 'utf8'));
          assert.equal('Launch' in conf, false, `token ${json(bad)}`);
        } finally {
          await withTimeout(plugin.stop(), 5000, 'stop');
        }
      }
      withEnv(t, { GOPLUG_DIR: undefined });
      assert.throws(() => new Plugin({ name: 'X', engine }), (err) => err instanceof goplug.ConfigError && /GOPLUG_DIR/.test(err.message));
    });

    test('a second plugin on a live socket is refused; a stale socket is replaced', T, async (t) => {
      const { dir, plugin } = await echoPlugin(t, engine);
      const twin = new Plugin({ location: dir, name: 'Echo', namespace: 'Node', engine });
      t.after(() => withTimeout(twin.stop(), 5000, 'twin stop'));
      await assert.rejects(withTimeout(twin.start(), 5000, 'twin start'), { code: 'PLUGIN_ALREADY_RUNNING' });
      assert.ok(fs.existsSync(plugin.pconfPath));
      const c = await RawClient.open(t, plugin.sockPath);
      assert.equal((await c.request('/Ping', 'x')).body.toString(), 'x');

      // A socket file left by a process that died: nobody answers on it, so it is taken over.
      const dir2 = tempDir(t);
      const stale = path.join(dir2, 'Stale.sock');
      const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${json(stale)}, () => process.kill(process.pid, 'SIGKILL'))`], { stdio: 'ignore' });
      t.after(() => child.kill('SIGKILL'));
      await withTimeout(new Promise((resolve) => child.once('exit', resolve)), 5000, 'the child to die');
      assert.ok(fs.lstatSync(stale).isSocket());
      const p2 = await startPlugin(t, { location: dir2, name: 'Stale', namespace: '', engine });
      const c2 = await RawClient.open(t, p2.sockPath);
      assert.equal((await c2.request('/Ping', 'y')).body.toString(), 'y');
    });
  });
}

test('constructor options and names are checked like the Python plugin', T, () => {
  assert.throws(() => new Plugin({ location: '/tmp', name: '' }), goplug.ConfigError);
  assert.throws(() => new Plugin({ location: '/tmp', name: 'a/b' }), goplug.ConfigError);
  assert.throws(() => new Plugin({ location: '/tmp', name: 'a', namespace: 'x@y' }), goplug.ConfigError);
  assert.throws(() => new Plugin({ location: '/tmp', name: 'a', engine: 'uws' }), goplug.ConfigError);
  assert.throws(() => new Plugin({ location: '/tmp', name: 'a', maxBodyy: 1 }), /unknown setting/);
  const p = new Plugin({ location: '/tmp/p', name: 'Do', namespace: 'Test' });
  assert.equal(p.settings.engine, 'net');
  assert.equal(p.label, 'Do@Test');
  assert.equal(p.url, 'unix://TestDo');
  assert.equal(p.running, false);
  assert.throws(() => p.registerMethod('Ping', () => ''), /reserved/);
  // Both orders: registerMethod(name, fn), and registerMethod(fn[, name]) like register_method.
  p.registerMethod(function Upper(b) { return b; });
  p.registerMethod((b) => b, 'Other');
  p.registerMethod('Third', (b) => b);
  assert.deepEqual(p.methods, ['Upper', 'Other', 'Third']);
  assert.deepEqual(p.callbacks, []);
});
