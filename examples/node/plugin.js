'use strict';
// An example goplug plugin in Node.js, built on the goplug package in sdk/js (which uses Node's
// standard library only: no npm install needed to run this file from the repository).
//
//   node examples/node/plugin.js DIR [--name Echo] [--namespace Node] [--engine net|http]
//
// DIR defaults to $GOPLUG_DIR (set by a registry that launches the plugin). Prints one line,
// "ready <path of the .pconf>", once it listens and has announced itself; logs errors to
// stderr; stops cleanly (removing its .pconf and socket) on SIGINT or SIGTERM.

// In a project of your own: `npm install path/to/sdk/js`, then require('goplug').
const { Plugin } = require('../../sdk/js');

function usage(message) {
  process.stderr.write(`${message}; usage: node plugin.js [DIR] [--name NAME] [--namespace NAMESPACE] [--engine net|http]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { dir: null, name: 'Echo', namespace: 'Node', engine: 'net' };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const eq = arg.indexOf('=');
    const key = arg.startsWith('--') && eq > 0 ? arg.slice(0, eq) : arg;
    if (key === '--name' || key === '--namespace' || key === '--engine') {
      const value = eq > 0 && arg.startsWith('--') ? arg.slice(eq + 1) : argv[++i];
      if (value === undefined) usage(`${key} needs a value`);
      opts[key.slice(2)] = value;
    } else if (arg === '-h' || arg === '--help') {
      usage('An example goplug plugin: methods Echo, Upper, Reverse, Fail, Notify.');
    } else if (arg.startsWith('--')) {
      usage(`unknown option ${arg}`);
    } else if (opts.dir === null) {
      opts.dir = arg;
    } else {
      usage(`unexpected argument ${arg}`);
    }
  }
  if (opts.dir === null) opts.dir = process.env.GOPLUG_DIR || null;
  if (opts.dir === null) usage('the plugin directory is required (an argument, or GOPLUG_DIR)');
  return opts;
}

// ASCII upper case, byte by byte (other bytes unchanged).
function upper(input) {
  const out = Buffer.allocUnsafe(input.length);
  for (let i = 0; i < input.length; i++) {
    const b = input[i];
    out[i] = b >= 0x61 && b <= 0x7a ? b - 0x20 : b;
  }
  return out;
}

function main() {
  const opts = parseArgs(process.argv.slice(2));
  let plugin;
  try {
    plugin = new Plugin({
      location: opts.dir,
      name: opts.name,
      namespace: opts.namespace,
      engine: opts.engine,
      stopper: () => {
        process.stderr.write(`${opts.name}: /Stop received (still serving until SIGTERM)\n`);
      },
    });
  } catch (err) {
    process.stderr.write(`${err.message}\n`);
    process.exit(2);
  }

  plugin.registerMethod('Echo', (input) => input);
  plugin.registerMethod('Upper', upper);
  plugin.registerMethod('Reverse', (input) => Buffer.from(input).reverse());
  plugin.registerMethod('Fail', () => {
    throw new Error('deliberate failure');
  });
  // Input "<callbackName>\n<data>": notify every subscriber of that callback, answer how many.
  plugin.registerMethod('Notify', async (input) => {
    const nl = input.indexOf(0x0a);
    const name = (nl < 0 ? input : input.subarray(0, nl)).toString('utf8');
    const data = nl < 0 ? Buffer.alloc(0) : Buffer.from(input.subarray(nl + 1));
    const count = await plugin.notify(name, data);
    return String(count);
  });

  plugin.stopOnSignals();
  plugin.start().then(
    (pconf) => process.stdout.write(`ready ${pconf}\n`),
    (err) => {
      process.stderr.write(`${opts.name}: cannot start: ${err.message}\n`);
      process.exit(1);
    },
  );
}

main();
