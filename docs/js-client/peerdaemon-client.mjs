// A client for peerdaemon's local socket (docs/local-api.md) in plain Node.js: no dependency.
//
//   import { connect } from './peerdaemon-client.mjs';
//   const client = await connect();                  // $PEERDAEMON_SOCKET, $XDG_RUNTIME_DIR, /tmp
//   console.log(await client.call('status'));
//   const sub = await client.subscribe('env.subscribe', { id });
//   for await (const event of sub) console.log(event.type, event.paths);
//   client.close();
//
// Frames are a 4-byte big-endian length and one CBOR map (RFC 8949). The CBOR here is the
// subset the protocol uses: integers (BigInt past 2^53), floats, text, byte strings
// (Uint8Array), arrays, maps, true/false/null.

import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

export class DaemonError extends Error {
  constructor(code, message) {
    super(`${message} (${code})`);
    this.code = code;
  }
}

export function defaultSocketPath() {
  if (process.env.PEERDAEMON_SOCKET) return process.env.PEERDAEMON_SOCKET;
  if (process.env.XDG_RUNTIME_DIR) {
    return path.join(process.env.XDG_RUNTIME_DIR, 'peerdaemon', 'peerdaemon.sock');
  }
  return path.join('/tmp', `peerdaemon-${process.getuid()}`, 'peerdaemon.sock');
}

// --- CBOR ---------------------------------------------------------------------------------------
function head(major, n, out) {
  if (typeof n === 'bigint') {
    out.push(Buffer.from([(major << 5) | 27]), bigBytes(n));
  } else if (n < 24) out.push(Buffer.from([(major << 5) | n]));
  else if (n < 0x100) out.push(Buffer.from([(major << 5) | 24, n]));
  else if (n < 0x10000) {
    const b = Buffer.alloc(3);
    b[0] = (major << 5) | 25;
    b.writeUInt16BE(n, 1);
    out.push(b);
  } else if (n < 0x100000000) {
    const b = Buffer.alloc(5);
    b[0] = (major << 5) | 26;
    b.writeUInt32BE(n, 1);
    out.push(b);
  } else head(major, BigInt(n), out);
}

function bigBytes(n) {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(n);
  return b;
}

function encodeItem(value, out) {
  if (value === null || value === undefined) out.push(Buffer.from([0xf6]));
  else if (value === true) out.push(Buffer.from([0xf5]));
  else if (value === false) out.push(Buffer.from([0xf4]));
  else if (typeof value === 'bigint') {
    if (value >= 0n) head(0, value, out);
    else head(1, -1n - value, out);
  } else if (typeof value === 'number') {
    if (Number.isSafeInteger(value)) {
      if (value >= 0) head(0, value, out);
      else head(1, -1 - value, out);
    } else {
      const b = Buffer.alloc(9);
      b[0] = 0xfb;
      b.writeDoubleBE(value, 1);
      out.push(b);
    }
  } else if (typeof value === 'string') {
    const bytes = Buffer.from(value, 'utf8');
    head(3, bytes.length, out);
    out.push(bytes);
  } else if (value instanceof Uint8Array) {
    head(2, value.length, out);
    out.push(Buffer.from(value));
  } else if (Array.isArray(value)) {
    head(4, value.length, out);
    for (const item of value) encodeItem(item, out);
  } else if (typeof value === 'object') {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined);
    head(5, entries.length, out);
    for (const [k, v] of entries) {
      encodeItem(k, out);
      encodeItem(v, out);
    }
  } else throw new TypeError(`cannot encode ${typeof value}`);
}

export function encode(value) {
  const out = [];
  encodeItem(value, out);
  return Buffer.concat(out);
}

function half(bits) {
  const exp = (bits >> 10) & 0x1f;
  const frac = bits & 0x3ff;
  const sign = bits & 0x8000 ? -1 : 1;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

export function decode(buf) {
  let pos = 0;
  const length = (info) => {
    if (info < 24) return info;
    if (info === 24) return buf[pos++];
    if (info === 25) return (pos += 2), buf.readUInt16BE(pos - 2);
    if (info === 26) return (pos += 4), buf.readUInt32BE(pos - 4);
    if (info === 27) {
      const n = buf.readBigUInt64BE(pos);
      pos += 8;
      return n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n;
    }
    if (info === 31) return -1; // indefinite
    throw new Error(`bad CBOR length ${info}`);
  };
  const BREAK = Symbol('break');
  const item = () => {
    const first = buf[pos++];
    if (first === undefined) throw new Error('truncated CBOR');
    const major = first >> 5;
    const info = first & 0x1f;
    if (major === 7) {
      if (info === 20) return false;
      if (info === 21) return true;
      if (info === 22 || info === 23) return null;
      if (info === 25) return (pos += 2), half(buf.readUInt16BE(pos - 2));
      if (info === 26) return (pos += 4), buf.readFloatBE(pos - 4);
      if (info === 27) return (pos += 8), buf.readDoubleBE(pos - 8);
      if (info === 31) return BREAK;
      throw new Error(`unsupported CBOR simple value ${info}`);
    }
    const n = length(info);
    if (major === 0) return n;
    if (major === 1) return typeof n === 'bigint' ? -1n - n : -1 - n;
    if (major === 2 || major === 3) {
      let bytes;
      if (n === -1) {
        const parts = [];
        for (let part = item(); part !== BREAK; part = item()) parts.push(Buffer.from(part));
        bytes = Buffer.concat(parts);
      } else {
        bytes = buf.subarray(pos, pos + n);
        pos += n;
      }
      return major === 2 ? new Uint8Array(bytes) : bytes.toString('utf8');
    }
    if (major === 4) {
      const out = [];
      if (n === -1) for (let v = item(); v !== BREAK; v = item()) out.push(v);
      else for (let i = 0; i < n; i++) out.push(item());
      return out;
    }
    if (major === 5) {
      const out = {};
      const pair = () => {
        const k = item();
        if (k === BREAK) return false;
        out[k] = item();
        return true;
      };
      if (n === -1) while (pair());
      else for (let i = 0; i < n; i++) pair();
      return out;
    }
    if (major === 6) return item(); // a tag: its content (the daemon sends none)
    throw new Error(`bad CBOR major type ${major}`);
  };
  const value = item();
  if (pos !== buf.length) throw new Error('trailing bytes after the CBOR item');
  return value;
}

// --- the client ---------------------------------------------------------------------------------
class Subscription {
  constructor(client, sub, initial) {
    this.client = client;
    this.sub = sub;
    this.initial = initial;
    this.queue = [];
    this.waiters = [];
    this.closed = false;
  }
  push(event) {
    const waiter = this.waiters.shift();
    if (waiter) waiter({ value: event, done: false });
    else this.queue.push(event);
  }
  end() {
    this.closed = true;
    for (const waiter of this.waiters.splice(0)) waiter({ value: undefined, done: true });
  }
  next() {
    if (this.queue.length) return Promise.resolve({ value: this.queue.shift(), done: false });
    if (this.closed) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this.waiters.push(resolve));
  }
  async return() {
    await this.close();
    return { value: undefined, done: true };
  }
  [Symbol.asyncIterator]() {
    return this;
  }
  async close() {
    if (this.closed) return;
    this.end();
    this.client.subs.delete(this.sub);
    if (!this.client.ended) await this.client.call('unsubscribe', { sub: this.sub }).catch(() => {});
  }
}

export class Client {
  constructor(socket) {
    this.socket = socket;
    this.nextId = 1;
    this.pending = new Map();
    this.subs = new Map();
    this.buffer = Buffer.alloc(0);
    this.ended = false;
    this.early = new Map(); // pushes read in the same chunk as their subscription's response
    socket.on('data', (chunk) => this.receive(chunk));
    socket.on('close', () => this.fail(new Error('connection to the daemon closed')));
    socket.on('error', (error) => this.fail(error));
  }
  receive(chunk) {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    while (this.buffer.length >= 4) {
      const size = this.buffer.readUInt32BE(0);
      if (this.buffer.length < 4 + size) break;
      const message = decode(this.buffer.subarray(4, 4 + size));
      this.buffer = this.buffer.subarray(4 + size);
      if ('id' in message) {
        const waiter = this.pending.get(message.id);
        this.pending.delete(message.id);
        if (!waiter) continue; // an error the daemon could not attribute ("id": null)
        if (message.error) waiter.reject(new DaemonError(message.error.code, message.error.message));
        else waiter.resolve(message.result);
      } else if ('sub' in message) {
        const sub = this.subs.get(message.sub);
        if (sub) this.deliver(sub, message.event);
        else if (this.early.size < 64) {
          if (!this.early.has(message.sub)) this.early.set(message.sub, []);
          this.early.get(message.sub).push(message.event);
        }
      }
    }
  }
  deliver(sub, event) {
    sub.push(event);
    if (event?.type === 'deleted') sub.end(); // the daemon closed it
  }
  fail(error) {
    if (this.ended) return;
    this.ended = true;
    for (const waiter of this.pending.values()) waiter.reject(error);
    this.pending.clear();
    for (const sub of this.subs.values()) sub.end();
  }
  call(op, args = {}) {
    if (this.ended) return Promise.reject(new Error('connection to the daemon closed'));
    const id = this.nextId++;
    const payload = encode({ id, op, args });
    const frame = Buffer.alloc(4);
    frame.writeUInt32BE(payload.length);
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.socket.write(Buffer.concat([frame, payload]));
    });
  }
  async subscribe(op, args = {}) {
    // Pushes come right after the response that creates the subscription, maybe in the same
    // chunk: those read before it is registered wait in `early`.
    const initial = await this.call(op, args);
    const sub = new Subscription(this, initial.sub, initial);
    this.subs.set(initial.sub, sub);
    for (const event of this.early.get(initial.sub) ?? []) this.deliver(sub, event);
    this.early.delete(initial.sub);
    return sub;
  }
  close() {
    this.ended = true;
    this.socket.end();
  }
}

// The daemon's socket lives in a 0700 directory of its user; a client checks that the socket it
// is about to talk to belongs to its own user (or root) before sending anything (a hub token,
// say) to it: another user could otherwise bind the path first (docs/local-api.md, section 1).
function checkOwner(socketPath) {
  const uid = process.getuid?.();
  if (uid === undefined) return;
  const st = fs.statSync(socketPath);
  if (st.uid !== uid && st.uid !== 0) {
    throw new Error(`${socketPath} belongs to uid ${st.uid}, not to this user`);
  }
}

export function connect(socketPath = defaultSocketPath()) {
  checkOwner(socketPath);
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath);
    socket.once('connect', () => resolve(new Client(socket)));
    socket.once('error', reject);
  });
}

