#!/usr/bin/env node
// peerdaemon mock runner: serves Mockoon environments with Mockoon's own engine
// (@mockoon/commons-server, pinned in package-lock.json beside this file), driven by JSON lines:
// commands on stdin, events on stdout. The protocol is specified in docs/mock-runner.md; keep the
// two in step.
//
//   node runner.mjs [--confine] [--allow-host NAME]... [--faker-seed N]
//
// Nothing but protocol events is ever written to stdout: console output and anything else a
// library writes there goes to stderr (free-form diagnostics, never parsed).
//
// The engine is loaded with require() (createRequire; ESM import would ignore NODE_PATH): from
// this folder's own node_modules when it has one, else from the first NODE_PATH directory that
// has it, else by Node's ordinary resolution.

import { AsyncLocalStorage } from 'node:async_hooks';
import { randomBytes } from 'node:crypto';
import dns from 'node:dns';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { format } from 'node:util';

const RUNNER_PROTOCOL = 1;
const MAX_COMMAND_LINE = 64 * 1024 * 1024; // bytes, without the newline
const MAX_EVENT_LINE = 1024 * 1024; // bytes, without the newline: no event line is longer
const DEFAULT_LOG_BODY_BYTES = 4096;
const MAX_LOG_BODY_BYTES = 512 * 1024;
const MAX_MESSAGE_CHARS = 4096;
const START_TIMEOUT_MS = 30_000; // a start that neither listens nor fails by then is an error
const STOP_TIMEOUT_MS = 5_000; // a stop that does not complete by then is taken as done
const DRAIN_MS = 60_000; // on a restart, requests in flight get this long to complete
const EOF_SETTLE_MS = 10_000; // at stdin EOF, commands in progress get this long to finish

const RUNNER_DIR = path.dirname(fileURLToPath(import.meta.url));
const NODE_PATH = process.env.NODE_PATH || ''; // read before --confine empties the environment

// --- stdout is for protocol events only ---------------------------------------------------------
const stdout = process.stdout;
const writeStdout = stdout.write.bind(stdout);
let stdoutBroken = false;
stdout.on('error', () => {
  stdoutBroken = true; // the reader went away (EPIPE): keep serving, write nothing more
});
// anything else that writes to stdout (a library's console.log, ...) goes to stderr
stdout.write = (...args) => process.stderr.write(...args);
{
  const errorConsole = new console.Console({ stdout: process.stderr, stderr: process.stderr });
  for (const method of ['log', 'info', 'debug', 'dir', 'dirxml', 'table', 'trace', 'group', 'groupCollapsed']) {
    if (typeof errorConsole[method] === 'function') console[method] = errorConsole[method].bind(errorConsole);
  }
}

function diag(...args) {
  try {
    process.stderr.write(`mock-runner: ${format(...args)}\n`);
  } catch {
    // stderr gone: nothing to do
  }
}

// --- command line -------------------------------------------------------------------------------
function usage(message) {
  process.stderr.write(
    `mock-runner: ${message}\nusage: node runner.mjs [--confine] [--allow-host NAME]... [--faker-seed N]\n`
  );
  process.exit(2);
}

function parseArgs(argv) {
  const options = { confine: false, allowHosts: [], fakerSeed: undefined };
  for (let i = 0; i < argv.length; i += 1) {
    let arg = argv[i];
    let value;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const takeValue = () => {
      if (value !== undefined) return value;
      i += 1;
      if (i >= argv.length) usage(`${arg} needs a value`);
      return argv[i];
    };
    if (arg === '--confine' && value === undefined) {
      options.confine = true;
    } else if (arg === '--allow-host') {
      options.allowHosts.push(takeValue());
    } else if (arg === '--faker-seed') {
      const raw = takeValue();
      if (!/^-?\d+$/.test(raw) || !Number.isSafeInteger(Number(raw))) {
        usage(`--faker-seed wants an integer, not ${JSON.stringify(raw)}`);
      }
      options.fakerSeed = Number(raw);
    } else {
      usage(`unknown argument ${JSON.stringify(argv[i])}`);
    }
  }
  return options;
}

// --- addresses and the allow list ---------------------------------------------------------------
/** An IP literal's 4 or 16 bytes, or null. IPv4-mapped IPv6 (::ffff:a.b.c.d) gives the 4 bytes. */
function ipBytes(address) {
  let text = String(address);
  if (text.startsWith('[') && text.endsWith(']')) text = text.slice(1, -1);
  const zone = text.indexOf('%');
  if (zone >= 0) text = text.slice(0, zone);
  const kind = net.isIP(text);
  if (kind === 4) return Uint8Array.from(text.split('.').map(Number));
  if (kind !== 6) return null;
  // expand an IPv6 literal, possibly ending in a dotted IPv4 part
  let tail = [];
  const dotted = text.match(/^(.*:)(\d+\.\d+\.\d+\.\d+)$/);
  if (dotted) {
    const v4 = dotted[2].split('.').map(Number);
    tail = [(v4[0] << 8) | v4[1], (v4[2] << 8) | v4[3]];
    text = dotted[1].endsWith('::') ? dotted[1] : dotted[1].slice(0, -1);
  }
  const gap = text.indexOf('::');
  const parse = (part) => (part === '' ? [] : part.split(':').map((h) => parseInt(h, 16)));
  const left = parse(gap >= 0 ? text.slice(0, gap) : text);
  const right = gap >= 0 ? parse(text.slice(gap + 2)) : [];
  const fill = gap >= 0 ? 8 - left.length - right.length - tail.length : 0;
  if (fill < 0) return null;
  const groups = [...left, ...new Array(fill).fill(0), ...right, ...tail];
  if (groups.length !== 8) return null;
  const bytes = new Uint8Array(16);
  groups.forEach((g, i) => {
    bytes[2 * i] = g >> 8;
    bytes[2 * i + 1] = g & 0xff;
  });
  const mapped = bytes.slice(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff;
  return mapped ? bytes.slice(12) : bytes;
}

function parseCidr(text) {
  const slash = text.lastIndexOf('/');
  const addr = slash >= 0 ? text.slice(0, slash) : text;
  const bytes = ipBytes(addr);
  if (!bytes) return null;
  let prefix = bytes.length * 8;
  if (slash >= 0) {
    const raw = text.slice(slash + 1);
    if (!/^\d+$/.test(raw)) return null;
    prefix = Number(raw);
    // an IPv4-mapped IPv6 network: its prefix counts the 96 mapped bits
    if (bytes.length === 4 && net.isIP(addr.replace(/^\[|\]$/g, '')) === 6) prefix -= 96;
    if (prefix < 0 || prefix > bytes.length * 8) return null;
  }
  return { bytes, prefix };
}

function inCidr(bytes, cidr) {
  if (bytes.length !== cidr.bytes.length) return false;
  let bits = cidr.prefix;
  for (let i = 0; bits > 0; i += 1, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;
    if ((bytes[i] & mask) !== (cidr.bytes[i] & mask)) return false;
  }
  return true;
}

// addresses a confined runner never dials unless an --allow-host IP/CIDR entry lists them
const SPECIAL_NETWORKS = [
  '0.0.0.0/8', // "this network", unspecified
  '10.0.0.0/8', // RFC 1918
  '100.64.0.0/10', // CGNAT (RFC 6598)
  '127.0.0.0/8', // loopback
  '169.254.0.0/16', // link-local
  '172.16.0.0/12', // RFC 1918
  '192.0.0.0/24', // IETF protocol assignments
  '192.168.0.0/16', // RFC 1918
  '198.18.0.0/15', // benchmarking
  '224.0.0.0/4', // multicast
  '240.0.0.0/4', // reserved, broadcast
  '::/96', // unspecified, loopback, IPv4-compatible
  '100::/64', // discard
  '64:ff9b::/96', // NAT64 (embeds an IPv4 address)
  '64:ff9b:1::/48', // local-use NAT64
  '2002::/16', // 6to4 (embeds an IPv4 address)
  'fc00::/7', // unique local
  'fe80::/10', // link-local
  'fec0::/10', // site-local (deprecated)
  'ff00::/8' // multicast
].map(parseCidr);

function isSpecialAddress(bytes) {
  return SPECIAL_NETWORKS.some((cidr) => inCidr(bytes, cidr));
}

function normalizeHostName(name) {
  return String(name).trim().toLowerCase().replace(/\.$/, '');
}

function parseAllowList(entries) {
  const list = { names: new Set(), suffixes: [], networks: [] };
  for (const entry of entries) {
    const text = entry.trim();
    const cidr = parseCidr(text);
    if (cidr) {
      list.networks.push(cidr);
    } else if (/^\*\.[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$/i.test(text)) {
      list.suffixes.push(normalizeHostName(text.slice(1))); // ".example.com"
    } else if (/^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$/i.test(text)) {
      list.names.add(normalizeHostName(text));
    } else {
      usage(`--allow-host ${JSON.stringify(entry)} is neither a host name, *.suffix, IP address nor CIDR`);
    }
  }
  return list;
}

// --- the confined network -----------------------------------------------------------------------
const context = new AsyncLocalStorage(); // { id } of the server whose work is running

function currentServerId() {
  const store = context.getStore();
  return store && typeof store.id === 'string' ? store.id : null;
}

function blockedError(message) {
  const error = new Error(message);
  error.code = 'ECONNREFUSED';
  error.peerdaemonBlocked = true;
  return error;
}

function installNetworkConfinement(allow) {
  const ipAllowed = (bytes) => allow.networks.some((cidr) => inCidr(bytes, cidr));
  const nameAllowed = (name) =>
    allow.names.has(name) || allow.suffixes.some((suffix) => name.endsWith(suffix) && name.length > suffix.length);
  const resolvedAllowed = (address) => {
    const bytes = ipBytes(address);
    if (!bytes) return false;
    return !isSpecialAddress(bytes) || ipAllowed(bytes);
  };

  const confinedLookup = (inner, host, port, id) =>
    function lookup(hostname, options, callback) {
      if (typeof options === 'function') {
        callback = options;
        options = {};
      } else if (typeof options === 'number') {
        options = { family: options };
      }
      const wantAll = Boolean(options && options.all);
      inner(hostname, { ...(options || {}), all: true }, (error, addresses) => {
        if (error) {
          callback(error);
          return;
        }
        const list = Array.isArray(addresses) ? addresses : [{ address: addresses, family: net.isIP(addresses) }];
        const allowed = list.filter((entry) => resolvedAllowed(entry.address));
        if (allowed.length === 0) {
          const shown = list.map((entry) => entry.address).join(', ');
          const reason = `${hostname} resolves to ${shown || 'no address'}, not an allowed address`;
          emitBlocked(id, host, port, reason);
          callback(blockedError(`connection to ${hostname}:${port} refused by --confine: ${reason}`));
          return;
        }
        if (wantAll) callback(null, allowed);
        else callback(null, allowed[0].address, allowed[0].family);
      });
    };

  const originalConnect = net.Socket.prototype.connect;
  net.Socket.prototype.connect = function confinedConnect(...args) {
    // normalise the forms connect() takes: ([options, cb]) from net.connect's own normalisation,
    // (options[, cb]), (path[, cb]), (port[, host][, cb])
    let options;
    let callback;
    if (Array.isArray(args[0])) {
      [options, callback] = args[0];
    } else if (args[0] !== null && typeof args[0] === 'object') {
      options = args[0];
      callback = args[1];
    } else if (typeof args[0] === 'string' && !/^\s*\d+\s*$/.test(args[0])) {
      options = { path: args[0] };
      callback = args[1];
    } else {
      options = { port: args[0] };
      if (typeof args[1] === 'string') {
        options.host = args[1];
        callback = args[2];
      } else {
        callback = args[1];
      }
    }
    if (typeof callback !== 'function') callback = undefined;
    options = options || {};
    const id = currentServerId();
    const refuse = (host, port, reason) => {
      emitBlocked(id, host, port, reason);
      const error = blockedError(
        `connection to ${host}${port === null ? '' : `:${port}`} refused by --confine: ${reason}`
      );
      // as if connecting (writes wait for the connection), then fail like a refused connection,
      // after the caller has attached its listeners
      this.connecting = true;
      setImmediate(() => this.destroy(error));
      return this;
    };
    if (options.path !== undefined && options.path !== null) {
      return refuse(String(options.path), null, 'local (IPC) sockets are not allowed');
    }
    const rawHost =
      options.host === undefined || options.host === null || options.host === '' ? 'localhost' : String(options.host);
    const port = options.port === undefined || options.port === null ? null : Number(options.port);
    const literal = ipBytes(rawHost);
    if (literal) {
      if (!ipAllowed(literal)) return refuse(rawHost, port, 'address not in the --allow-host list');
      return originalConnect.call(this, options, callback);
    }
    const host = normalizeHostName(rawHost);
    if (!nameAllowed(host)) return refuse(rawHost, port, 'host name not in the --allow-host list');
    const lookup = confinedLookup(
      typeof options.lookup === 'function' ? options.lookup : dns.lookup,
      rawHost,
      port,
      id
    );
    return originalConnect.call(this, { ...options, lookup }, callback);
  };
}

// --- events -------------------------------------------------------------------------------------
function writeLine(line) {
  if (stdoutBroken) return;
  try {
    writeStdout(line + '\n');
  } catch {
    stdoutBroken = true;
  }
}

function capText(text, chars = MAX_MESSAGE_CHARS) {
  const value = String(text ?? '');
  return value.length > chars ? `${value.slice(0, chars)}…` : value;
}

function emit(event) {
  let line = JSON.stringify(event);
  if (Buffer.byteLength(line) > MAX_EVENT_LINE) {
    // only a transaction can grow this large (every other field is capped where it is made)
    line = event.event === 'transaction' ? shrinkTransaction(event) : null;
    if (line === null) {
      diag(`dropped a ${event.event} event too large for one line`);
      return;
    }
  }
  writeLine(line);
}

function emitError(id, code, message, fatal, extra = {}) {
  emit({ event: 'error', id: id ?? null, code, message: capText(message), fatal: Boolean(fatal), ...extra });
}

function emitBlocked(id, host, port, reason) {
  emit({
    event: 'blocked',
    id: id ?? null,
    host: capText(host, 1024),
    port: Number.isFinite(port) ? port : null,
    reason
  });
}

// --- engine -------------------------------------------------------------------------------------
const options = parseArgs(process.argv.slice(2));
const allowList = parseAllowList(options.allowHosts);

if (options.confine) {
  // nothing of the runner's own environment is visible to the environments it serves
  for (const key of Object.keys(process.env)) delete process.env[key];
  installNetworkConfinement(allowList);
}

function loadEngine() {
  // this folder's node_modules, then each NODE_PATH entry, then Node's ordinary resolution
  const require = createRequire(import.meta.url);
  const candidates = [path.join(RUNNER_DIR, 'node_modules'), ...NODE_PATH.split(path.delimiter).filter(Boolean)].map(
    (dir) => path.resolve(dir, '@mockoon', 'commons-server', 'package.json')
  );
  const packageJsonPath =
    candidates.find((file) => fs.existsSync(file)) ?? require.resolve('@mockoon/commons-server/package.json');
  const engineRequire = createRequire(packageJsonPath);
  const packageJson = engineRequire(packageJsonPath);
  const main = engineRequire.resolve(path.dirname(packageJsonPath)); // its dist/cjs/index.js
  const server = engineRequire(main);
  // @mockoon/commons as the engine itself resolves it: one copy, one version
  const commonsRequire = createRequire(main);
  const commons = commonsRequire('@mockoon/commons');
  const commonsVersion = commonsRequire('@mockoon/commons/package.json').version;
  let ws = null;
  try {
    ws = commonsRequire('./libs/server/ws');
  } catch {
    diag("could not load the engine's libs/server/ws: WebSocket broadcast contexts stay process-wide");
  }
  return { server, commons, ws, version: packageJson.version, commonsVersion, location: path.dirname(packageJsonPath) };
}

let engine;
try {
  engine = loadEngine();
} catch (error) {
  diag(`cannot load @mockoon/commons-server (run \`npm ci\` in ${RUNNER_DIR}, or set NODE_PATH): ${error.message}`);
  process.exit(3);
}
const { MockoonServer, ServerMessages, redactHeaders } = engine.server;
const {
  Migrations,
  HighestMigrationId,
  EnvironmentSchema,
  repairRefs,
  ServerErrorCodes,
  defaultEnvironmentVariablesPrefix,
  deterministicStringify
} = engine.commons;
if (engine.version !== '9.9.0') diag(`engine @mockoon/commons-server ${engine.version}, written for 9.9.0`);

const START_FAILURES = new Set([
  ServerErrorCodes.PORT_ALREADY_USED,
  ServerErrorCodes.PORT_INVALID,
  ServerErrorCodes.HOSTNAME_UNAVAILABLE,
  ServerErrorCodes.HOSTNAME_UNKNOWN,
  ServerErrorCodes.CERT_FILE_NOT_FOUND,
  ServerErrorCodes.UNKNOWN_SERVER_ERROR
]);

// One WebSocket broadcast context per server instead of Mockoon's process-wide singleton (it is
// keyed by route path and closed whole when any server stops: servers would disturb each other).
{
  const BroadcastContext = engine.ws && engine.ws.BroadcastContext;
  if (BroadcastContext && typeof BroadcastContext.getInstance === 'function') {
    const shared = BroadcastContext.getInstance.bind(BroadcastContext);
    const ownContexts = new WeakMap();
    let active = null;
    BroadcastContext.getInstance = () => {
      if (!active) return shared();
      let own = ownContexts.get(active);
      if (!own) {
        own = new BroadcastContext();
        ownContexts.set(active, own);
      }
      return own;
    };
    for (const method of [
      'handleBroadcastResponse',
      'closeWsServer',
      'closeWsServers',
      'updateEnvironment',
      'updateDisabledRoutes',
      'stop',
      'start'
    ]) {
      const original = MockoonServer.prototype[method];
      if (typeof original !== 'function') continue;
      MockoonServer.prototype[method] = function withOwnBroadcastContext(...args) {
        const previous = active;
        active = this;
        try {
          return original.apply(this, args);
        } finally {
          active = previous;
        }
      };
    }
  }
}

// --- confined files -----------------------------------------------------------------------------
const REFUSED_DIR = `.peerdaemon-refused-${randomBytes(16).toString('hex')}`;

/** realpath of `target`, or of its nearest existing ancestor joined with the rest. */
function realPathLoose(target) {
  let current = path.resolve(target);
  const rest = [];
  for (;;) {
    try {
      return path.join(fs.realpathSync(current), ...rest);
    } catch {
      const parent = path.dirname(current);
      if (parent === current) return path.resolve(target);
      rest.unshift(path.basename(current));
      current = parent;
    }
  }
}

function isInside(base, candidate) {
  const relative = path.relative(base, candidate);
  return relative === '' || (relative !== '..' && !relative.startsWith(`..${path.sep}`) && !path.isAbsolute(relative));
}

function serverBase(server) {
  if (!server.peerdaemonBase) server.peerdaemonBase = realPathLoose(path.resolve(server.options.environmentDirectory));
  return server.peerdaemonBase;
}

if (options.confine) {
  const originalSafePath = MockoonServer.prototype.getSafeFilePath;
  MockoonServer.prototype.getSafeFilePath = function confinedSafeFilePath(filePath, request) {
    const resolved = originalSafePath.call(this, filePath, request); // Mockoon's own checks first
    const base = serverBase(this);
    const real = realPathLoose(resolved);
    if (isInside(base, real)) return real;
    emitError(this.peerdaemonId, 'BLOCKED', `file path ${resolved} is outside the environment directory`, false);
    // a path that does not exist, so Mockoon answers as for a missing file
    return path.join(base, REFUSED_DIR, path.basename(resolved) || 'file');
  };

  const originalTls = MockoonServer.prototype.buildTLSOptions;
  MockoonServer.prototype.buildTLSOptions = function confinedTlsOptions(environment) {
    const tls = (environment && environment.tlsOptions) || {};
    const used = [];
    if (tls.type === 'PFX' && tls.pfxPath) used.push(tls.pfxPath);
    else if (tls.type === 'CERT' && tls.certPath && tls.keyPath) used.push(tls.certPath, tls.keyPath);
    if (used.length > 0 && tls.caPath) used.push(tls.caPath);
    const base = serverBase(this);
    for (const file of used) {
      const text = String(file);
      const resolved = path.isAbsolute(text) ? path.resolve(text) : path.resolve(base, text);
      if (/{{/.test(text) || !isInside(base, realPathLoose(resolved))) {
        emitError(
          this.peerdaemonId,
          'BLOCKED',
          `TLS file ${text} is templated or outside the environment directory`,
          false
        );
        const error = new Error(`TLS file refused by --confine: ${text}`);
        error.code = 'ENOENT';
        throw error;
      }
    }
    return originalTls.call(this, environment);
  };
}

// --- environments -------------------------------------------------------------------------------
class Refused extends Error {}

/** What `mockoon-cli start --repair` does to a parsed data file (its libs/data.js). */
function prepareEnvironment(raw) {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    throw new Refused('the environment is not a JSON object');
  }
  const environment = structuredClone(raw);
  if (environment.lastMigration > HighestMigrationId) {
    throw new Refused(
      `the environment was created with a more recent version of Mockoon (lastMigration ${environment.lastMigration}, this engine knows up to ${HighestMigrationId})`
    );
  }
  try {
    Migrations.forEach((migration) => {
      if (migration.id > environment.lastMigration) migration.migrationFunction(environment);
    });
  } catch {
    environment.lastMigration = HighestMigrationId;
  }
  let validated = EnvironmentSchema.validate(environment).value;
  if (!validated || typeof validated !== 'object')
    throw new Refused('the environment is not a valid Mockoon environment');
  validated = repairRefs(validated);
  return validated;
}

function effective(spec) {
  const environment = { ...spec.environment };
  if (spec.port !== null) environment.port = spec.port;
  if (spec.hostname !== null) environment.hostname = spec.hostname;
  return {
    environment,
    port: environment.port,
    hostname: environment.hostname,
    tlsKey: deterministicStringify(environment.tlsOptions ?? null),
    directory: spec.directory
  };
}

// --- servers ------------------------------------------------------------------------------------
/** id -> { spec, inst }: the servers running now. */
const servers = new Map();
/** Instances on their way out after a restart: still completing their requests in flight. */
const draining = new Set();

function errorMessage(code, error, environment) {
  const template = ServerMessages[code];
  const detail = error && error.message ? error.message : '';
  switch (code) {
    case 'PORT_ALREADY_USED':
    case 'PORT_INVALID':
      return format(template, environment.port);
    case 'HOSTNAME_UNKNOWN':
    case 'HOSTNAME_UNAVAILABLE':
      return format(template, environment.hostname);
    case 'CERT_FILE_NOT_FOUND':
    case 'ROUTE_NO_LONGER_EXISTS':
      return template;
    case 'PROXY_ERROR':
      return `${format(template, environment.proxyHost)}: ${detail}`;
    default:
      return template ? format(template, detail) : detail || String(code);
  }
}

/** The error, or one it was caused by (fetch wraps its socket's error), is a refusal by --confine. */
function causedByConfinement(error) {
  for (let e = error, depth = 0; e && depth < 5; e = e.cause, depth += 1) {
    if (e.peerdaemonBlocked) return true;
  }
  return false;
}

function jsonSafe(value) {
  if (value === null || value === undefined) return undefined;
  try {
    const text = JSON.stringify(value);
    if (text === undefined || text.length > 16 * 1024) return undefined;
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function bodyText(body) {
  if (body === null || body === undefined) return '';
  if (typeof body === 'string') return body;
  if (Buffer.isBuffer(body) || body instanceof Uint8Array) return Buffer.from(body).toString('utf8');
  try {
    return typeof body === 'object' ? JSON.stringify(body) : String(body);
  } catch {
    return String(body);
  }
}

/** The first `limit` bytes of `text` in UTF-8, cut at a character boundary. */
function capUtf8(text, limit) {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length <= limit) return { text, bytes: bytes.length, cut: false };
  let end = limit;
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end -= 1;
  return { text: bytes.subarray(0, end).toString('utf8'), bytes: bytes.length, cut: true };
}

function headerList(headers, redact) {
  const list = Array.isArray(headers) ? headers.map((h) => ({ key: String(h.key), value: String(h.value) })) : [];
  return redact && typeof redactHeaders === 'function' ? redactHeaders(list) : list;
}

function transactionEvent(inst, transaction, timing) {
  const limit = inst.spec.logBodyBytes;
  const requestBody = capUtf8(bodyText(transaction.request.body), limit);
  const responseBody = capUtf8(bodyText(transaction.response.body), limit);
  const now = performance.now();
  return {
    event: 'transaction',
    id: inst.id,
    time: transaction.timestampMs ?? Date.now(),
    startTime: timing ? timing.startMs : null,
    method: String(transaction.request.method || '').toUpperCase(),
    path: transaction.request.urlPath ?? '',
    query: transaction.request.query ?? '',
    status: transaction.response.statusCode,
    statusMessage: transaction.response.statusMessage ?? '',
    route: transaction.request.route ?? null,
    routeUUID: transaction.routeUUID ?? null,
    routeResponseUUID: transaction.routeResponseUUID ?? null,
    durationMs: timing ? Math.max(0, Math.round(now - timing.t0)) : 0,
    proxied: Boolean(transaction.proxied),
    request: {
      headers: headerList(transaction.request.headers, inst.spec.redactHeaders),
      body: requestBody.text,
      bodyBytes: requestBody.bytes
    },
    response: {
      headers: headerList(transaction.response.headers, inst.spec.redactHeaders),
      body: responseBody.text,
      bodyBytes: responseBody.bytes
    },
    truncated: requestBody.cut || responseBody.cut
  };
}

function shrinkTransaction(event) {
  // too large for one line (headers, escapes): cut bodies and header values harder, then drop
  for (const [bodyLimit, valueLimit] of [
    [16384, 4096],
    [1024, 256],
    [0, 0]
  ]) {
    const smaller = { ...event, truncated: true };
    for (const side of ['request', 'response']) {
      const part = event[side];
      smaller[side] = {
        ...part,
        body: capUtf8(part.body, bodyLimit).text,
        headers:
          valueLimit === 0
            ? []
            : part.headers.map((h) => ({
                key: capUtf8(h.key, valueLimit).text,
                value: capUtf8(h.value, valueLimit).text
              }))
      };
    }
    for (const key of ['path', 'query', 'statusMessage', 'route']) {
      if (typeof smaller[key] === 'string') smaller[key] = capUtf8(smaller[key], valueLimit === 0 ? 1024 : 65536).text;
    }
    const line = JSON.stringify(smaller);
    if (Buffer.byteLength(line) <= MAX_EVENT_LINE) return line;
  }
  return null;
}

function serverOptions(spec) {
  return {
    environmentDirectory: spec.directory,
    disabledRoutes: [],
    fakerOptions: { locale: 'en', seed: options.fakerSeed },
    envVarsPrefix: defaultEnvironmentVariablesPrefix,
    enableAdminApi: false,
    disableTls: false,
    maxTransactionLogs: 1, // kept in memory for the admin API only, which is off
    enableRandomLatency: false,
    enableRouteMetadataHeaders: false
  };
}

function isListening(inst) {
  return Boolean(inst.server.serverInstance && inst.server.serverInstance.listening);
}

/**
 * Construct and start a server for `spec`. Resolves with the instance once it listens (after
 * writing `started`), or with null after writing a fatal `error`.
 */
function launch(spec) {
  const eff = effective(spec);
  const server = new MockoonServer(eff.environment, serverOptions(spec));
  const inst = {
    id: spec.id,
    spec,
    eff,
    server,
    inflight: 0,
    phase: 'starting',
    lastClose: null,
    drainTimer: null,
    onIdle: null
  };
  server.peerdaemonId = spec.id;

  // per request: when it arrived (for durationMs), and how many are in flight (for draining)
  const originalLogRequest = server.logRequest;
  server.logRequest = (request, response, next) => {
    const timing = { t0: performance.now(), startMs: Date.now() };
    inst.inflight += 1;
    // registered before Mockoon's own 'close' listener, which emits transaction-complete
    // synchronously right after this one: it finds its request's timing in inst.lastClose
    response.on('close', () => {
      inst.inflight -= 1;
      inst.lastClose = timing;
      if (inst.inflight === 0 && inst.onIdle) setImmediate(() => inst.onIdle && inst.inflight === 0 && inst.onIdle());
    });
    originalLogRequest(request, response, next);
  };

  server.on('transaction-complete', (transaction) => {
    const timing = inst.lastClose;
    inst.lastClose = null;
    try {
      emit(transactionEvent(inst, transaction, timing));
    } catch (error) {
      diag('cannot report a transaction:', error);
    }
  });
  server.on('callback-invoked', () => {});
  server.on('data-bucket-processed', () => {});

  return new Promise((resolve) => {
    let settled = false;
    const timer = setTimeout(
      () => fail(ServerErrorCodes.UNKNOWN_SERVER_ERROR, `server did not start within ${START_TIMEOUT_MS} ms`),
      START_TIMEOUT_MS
    );
    const settle = (value) => {
      if (settled) return false;
      settled = true;
      clearTimeout(timer);
      resolve(value);
      return true;
    };
    const cleanup = () => {
      inst.phase = 'failed';
      try {
        if (server.serverInstance && server.serverInstance.listening) server.serverInstance.close();
        context.run({ id: spec.id }, () => server.closeWsServers());
      } catch {
        // half-constructed: nothing to close
      }
    };
    function fail(code, message) {
      if (inst.phase !== 'starting') return;
      cleanup();
      emitError(spec.id, code, message, true);
      settle(null);
    }

    server.on('error', (code, error, payload) => {
      if (inst.phase === 'failed' || inst.phase === 'stopped') {
        // its outcome is written already; what follows is noise from the teardown
        diag(`${spec.id}: ${code} after the server stopped:`, error && error.message);
        return;
      }
      const extra = {};
      const details = jsonSafe(payload);
      if (details !== undefined) extra.details = details;
      if (causedByConfinement(error)) extra.blocked = true;
      const message = errorMessage(code, error, eff.environment);
      if (inst.phase === 'starting' && START_FAILURES.has(code)) {
        if (settled) return;
        cleanup();
        emitError(spec.id, code, message, true, extra);
        settle(null);
        return;
      }
      if (
        inst.phase === 'running' &&
        START_FAILURES.has(code) &&
        !isListening(inst) &&
        servers.get(spec.id)?.inst === inst
      ) {
        // the server went down under us
        servers.delete(spec.id);
        inst.phase = 'failed';
        emitError(spec.id, code, message, true, extra);
        return;
      }
      emitError(spec.id, code, message, false, extra);
    });

    server.on('started', () => {
      if (inst.phase !== 'starting') {
        // listening after all, but given up on (start timeout): do not keep the port
        if (inst.phase === 'failed') kill(inst);
        return;
      }
      inst.phase = 'running';
      const address = server.serverInstance.address();
      emit({
        event: 'started',
        id: spec.id,
        port: address && typeof address === 'object' ? address.port : eff.port,
        hostname: eff.hostname,
        address: address && typeof address === 'object' ? address.address : null,
        tls: typeof server.isTls === 'function' ? server.isTls() : Boolean(eff.environment.tlsOptions?.enabled)
      });
      settle(inst);
    });

    try {
      context.run({ id: spec.id }, () => server.start());
    } catch (error) {
      // e.g. TLS options that failed to build: Mockoon has emitted its error already, then
      // throws on the server instance it could not create
      if (!settled)
        fail(
          ServerErrorCodes.UNKNOWN_SERVER_ERROR,
          errorMessage(ServerErrorCodes.UNKNOWN_SERVER_ERROR, error, eff.environment)
        );
    }
  });
}

/** Mockoon's stop (closes every connection at once); resolves when done, or after a bound. */
function kill(inst) {
  return new Promise((resolve) => {
    inst.phase = 'stopped';
    inst.onIdle = null;
    if (inst.drainTimer) clearTimeout(inst.drainTimer);
    draining.delete(inst);
    const server = inst.server;
    if (!server.serverInstance) {
      resolve();
      return;
    }
    const timer = setTimeout(resolve, STOP_TIMEOUT_MS);
    server.once('stopped', () => {
      clearTimeout(timer);
      resolve();
    });
    try {
      context.run({ id: inst.id }, () => server.stop());
    } catch (error) {
      diag('stop failed:', error);
      clearTimeout(timer);
      resolve();
    }
  });
}

/**
 * Take a running instance out of service for a restart: stop listening at once (the port is
 * free when this returns), let its requests in flight complete (up to DRAIN_MS), then close
 * what remains (idle keep-alive connections, WebSockets).
 */
function retireGracefully(inst) {
  inst.phase = 'draining';
  draining.add(inst);
  try {
    if (inst.server.serverInstance && inst.server.serverInstance.listening) inst.server.serverInstance.close();
  } catch (error) {
    diag('close failed:', error);
  }
  const finish = () => {
    if (inst.phase === 'draining') kill(inst);
  };
  inst.onIdle = finish;
  inst.drainTimer = setTimeout(finish, DRAIN_MS);
  if (inst.inflight === 0) setImmediate(finish);
}

// --- commands -----------------------------------------------------------------------------------
class BadCommand extends Error {}

function requireId(command) {
  if (typeof command.id !== 'string' || command.id === '')
    throw new BadCommand(`${command.cmd}: "id" must be a non-empty string`);
  return command.id;
}

function optionalPort(value, what) {
  if (value === undefined || value === null) return null;
  if (!Number.isInteger(value)) throw new BadCommand(`${what}: "port" must be an integer or null`);
  return value;
}

function optionalHostname(value, what) {
  if (value === undefined || value === null) return null;
  if (typeof value !== 'string') throw new BadCommand(`${what}: "hostname" must be a string or null`);
  return value;
}

function logBodyBytes(value, what) {
  if (value === undefined || value === null) return DEFAULT_LOG_BODY_BYTES;
  if (!Number.isInteger(value) || value < 0) throw new BadCommand(`${what}: "logBodyBytes" must be an integer >= 0`);
  return Math.min(value, MAX_LOG_BODY_BYTES);
}

function directoryOf(value, what) {
  if (typeof value !== 'string' || value === '' || value.includes('\0'))
    throw new BadCommand(`${what}: "directory" must be a path`);
  if (options.confine && !path.isAbsolute(value)) throw new BadCommand(`${what}: "directory" must be an absolute path`);
  return path.resolve(value);
}

async function cmdStart(command, id) {
  const spec = {
    id,
    environment: null,
    directory: directoryOf(command.directory, 'start'),
    port: optionalPort(command.port, 'start'),
    hostname: optionalHostname(command.hostname, 'start'),
    logBodyBytes: logBodyBytes(command.logBodyBytes, 'start'),
    redactHeaders: command.redactHeaders === undefined ? true : Boolean(command.redactHeaders)
  };
  let refused = null;
  try {
    spec.environment = prepareEnvironment(command.environment);
  } catch (error) {
    refused =
      error instanceof Refused ? error.message : `the environment could not be prepared: ${error && error.message}`;
  }
  const previous = servers.get(id);
  if (previous) {
    servers.delete(id);
    retireGracefully(previous.inst);
    emit({ event: 'stopped', id, restart: true });
  }
  if (refused !== null) {
    emitError(id, 'ENVIRONMENT_REFUSED', refused, true);
    return;
  }
  const inst = await launch(spec);
  if (inst) servers.set(id, { spec, inst });
}

async function cmdUpdate(command, id) {
  const entry = servers.get(id);
  if (!entry) {
    emitError(id, 'UNKNOWN_SERVER', `no server ${JSON.stringify(id)} is running`, false);
    return;
  }
  const spec = { ...entry.spec };
  if ('port' in command) spec.port = optionalPort(command.port, 'update');
  if ('hostname' in command) spec.hostname = optionalHostname(command.hostname, 'update');
  if ('directory' in command) spec.directory = directoryOf(command.directory, 'update');
  if ('logBodyBytes' in command) spec.logBodyBytes = logBodyBytes(command.logBodyBytes, 'update');
  if ('redactHeaders' in command) spec.redactHeaders = Boolean(command.redactHeaders);
  try {
    spec.environment = prepareEnvironment(command.environment);
  } catch (error) {
    const message =
      error instanceof Refused ? error.message : `the environment could not be prepared: ${error && error.message}`;
    emitError(id, 'ENVIRONMENT_REFUSED', `${message}; the server keeps its previous environment`, false);
    return;
  }
  const before = entry.inst.eff;
  const after = effective(spec);
  if (
    before.port === after.port &&
    before.hostname === after.hostname &&
    before.tlsKey === after.tlsKey &&
    before.directory === after.directory
  ) {
    const inst = entry.inst;
    context.run({ id }, () => inst.server.updateEnvironment(after.environment));
    inst.spec = spec;
    inst.eff = after;
    entry.spec = spec;
    emit({ event: 'updated', id });
    return;
  }
  // listening settings changed: restart this server alone
  servers.delete(id);
  retireGracefully(entry.inst);
  emit({ event: 'stopped', id, restart: true });
  const inst = await launch(spec);
  if (inst) servers.set(id, { spec, inst });
}

async function cmdStop(command, id) {
  const entry = servers.get(id);
  servers.delete(id);
  // the instance serving now, and any earlier one still completing requests after a restart
  const instances = [...(entry ? [entry.inst] : []), ...[...draining].filter((inst) => inst.id === id)];
  await Promise.all(instances.map((inst) => kill(inst)));
  emit({ event: 'stopped', id });
}

/** Per-id queues: a server's commands run one after the other, in the order they were read. */
const queues = new Map();
const inProgress = new Set();

function enqueue(key, work) {
  const previous = queues.get(key) || Promise.resolve();
  const task = previous.then(work).catch((error) => {
    if (error instanceof BadCommand) emitError(key, 'BAD_COMMAND', error.message, false);
    else {
      diag('command failed:', error);
      emitError(key, 'UNKNOWN_SERVER_ERROR', `runner error: ${error && error.message}`, !servers.has(key));
    }
  });
  queues.set(key, task);
  inProgress.add(task);
  task.finally(() => {
    inProgress.delete(task);
    if (queues.get(key) === task) queues.delete(key);
  });
  return task;
}

let pongChain = Promise.resolve();

function handleLine(buffer) {
  const text = buffer.toString('utf8');
  if (text.trim() === '') return; // blank lines are ignored
  let command;
  try {
    command = JSON.parse(text);
  } catch (error) {
    emitError(null, 'BAD_COMMAND', `not JSON: ${error.message}`, false);
    return;
  }
  if (command === null || typeof command !== 'object' || Array.isArray(command) || typeof command.cmd !== 'string') {
    emitError(null, 'BAD_COMMAND', 'a command is a JSON object with a string "cmd"', false);
    return;
  }
  const badId = typeof command.id === 'string' ? command.id : null;
  try {
    switch (command.cmd) {
      case 'ping': {
        // written once every command read before it has written its outcome
        const earlier = [...inProgress];
        const n = command.n === undefined ? null : command.n;
        pongChain = pongChain.then(() => Promise.allSettled(earlier)).then(() => emit({ event: 'pong', n }));
        return;
      }
      case 'start': {
        const id = requireId(command);
        enqueue(id, () => cmdStart(command, id));
        return;
      }
      case 'update': {
        const id = requireId(command);
        enqueue(id, () => cmdUpdate(command, id));
        return;
      }
      case 'stop': {
        const id = requireId(command);
        enqueue(id, () => cmdStop(command, id));
        return;
      }
      default:
        emitError(badId, 'BAD_COMMAND', `unknown command ${JSON.stringify(capText(command.cmd, 100))}`, false);
    }
  } catch (error) {
    if (error instanceof BadCommand) emitError(badId, 'BAD_COMMAND', error.message, false);
    else throw error;
  }
}

// --- stdin --------------------------------------------------------------------------------------
let shuttingDown = false;

async function shutdown() {
  if (shuttingDown) return;
  shuttingDown = true;
  // commands already read get a bounded time to finish, then every server is stopped
  await Promise.race([Promise.allSettled([...inProgress]), new Promise((r) => setTimeout(r, EOF_SETTLE_MS).unref())]);
  const running = [...servers.entries()];
  servers.clear();
  await Promise.all([
    ...running.map(([id, entry]) => kill(entry.inst).then(() => emit({ event: 'stopped', id }))),
    ...[...draining].map((inst) => kill(inst))
  ]);
  if (stdoutBroken) process.exit(0);
  writeStdout('', () => process.exit(0));
}

{
  let chunks = [];
  let size = 0;
  let discarding = false;
  const tooLong = () =>
    emitError(null, 'BAD_COMMAND', `command line longer than ${MAX_COMMAND_LINE} bytes: skipped`, false);
  process.stdin.on('data', (data) => {
    let start = 0;
    for (;;) {
      const newline = data.indexOf(10, start);
      const piece = newline === -1 ? data.subarray(start) : data.subarray(start, newline);
      if (!discarding) {
        if (size + piece.length > MAX_COMMAND_LINE) {
          tooLong();
          chunks = [];
          size = 0;
          discarding = newline === -1;
        } else if (newline === -1) {
          if (piece.length) {
            chunks.push(Buffer.from(piece));
            size += piece.length;
          }
        } else {
          const line = chunks.length ? Buffer.concat([...chunks, piece]) : piece;
          chunks = [];
          size = 0;
          handleLine(line);
        }
      } else if (newline !== -1) {
        discarding = false; // the end of the line being skipped
      }
      if (newline === -1) break;
      start = newline + 1;
    }
  });
  process.stdin.on('end', () => {
    if (!discarding && size > 0) handleLine(Buffer.concat(chunks)); // a last line without newline
    chunks = [];
    shutdown();
  });
  process.stdin.on('error', (error) => {
    diag('stdin:', error.message);
    shutdown();
  });
}

process.on('uncaughtException', (error) => {
  diag('uncaught exception:', error);
  emitError(currentServerId(), 'UNKNOWN_SERVER_ERROR', `runner: ${error && error.message}`, false);
});
process.on('unhandledRejection', (reason) => {
  diag('unhandled rejection:', reason);
  emitError(
    currentServerId(),
    'UNKNOWN_SERVER_ERROR',
    `runner: ${reason && reason.message ? reason.message : String(reason)}`,
    false
  );
});
// a supervisor's SIGTERM/SIGINT: stop the servers as at EOF
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => shutdown());

emit({
  event: 'ready',
  runner: RUNNER_PROTOCOL,
  engine: engine.version,
  commons: engine.commonsVersion,
  node: process.version,
  pid: process.pid,
  confine: options.confine,
  engineDir: engine.location
});
