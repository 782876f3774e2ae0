// Drives the documented JavaScript client (docs/js-client/peerdaemon-client.mjs) against a real
// daemon: node local_socket_client.mjs SOCKET ENV_FILE. Prints one JSON line per step on stdout;
// after "subscribed" it waits for the change the Python side makes, then prints it and exits.
import fs from 'node:fs';
import { connect, DaemonError, decode, encode } from '../../docs/js-client/peerdaemon-client.mjs';

const [socketPath, envFile] = process.argv.slice(2);
const say = (step, data = {}) => console.log(JSON.stringify({ step, ...data }));

// the codec on values the protocol carries
const sample = { n: 1, big: 2n ** 60n, neg: -5, f: 1.5, s: 'é', b: new Uint8Array([0, 1, 255]), a: [null, true, false] };
const back = decode(encode(sample));
if (back.big !== 2n ** 60n || back.f !== 1.5 || back.s !== 'é' || back.b[2] !== 255 || back.a[1] !== true) {
  throw new Error(`CBOR round trip failed: ${JSON.stringify(back, (k, v) => (typeof v === 'bigint' ? String(v) : v))}`);
}

const client = await connect(socketPath);
const status = await client.call('status');
say('status', { environments: status.environments, version: status.version });

const { id } = await client.call('env.import', { json: fs.readFileSync(envFile, 'utf8') });
say('imported', { id });

try {
  await client.call('env.get', { id: 'no-such-environment' });
} catch (error) {
  say('error', { code: error instanceof DaemonError ? error.code : String(error) });
}

const update = await client.call('env.export', { id, format: 'yjs' });
const merged = await client.call('env.merge', { id, update });
say('yjs', { bytes: update.length, isBytes: update instanceof Uint8Array, changed: merged.changed });

const sub = await client.subscribe('env.subscribe', { id });
say('subscribed', { name: sub.initial.snapshot.name });
for await (const event of sub) {
  if (event.type === 'change') {
    say('change', { paths: event.paths, origin: event.origin, update: event.update instanceof Uint8Array });
    break;
  }
}
client.close();
