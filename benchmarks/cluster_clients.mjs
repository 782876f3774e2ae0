#!/usr/bin/env node
/**
 * y-websocket clients of one room spread over several hub processes (issue 14's figures):
 * `bench_cluster.py` runs it against a cluster of `hub serve --redis --postgres` processes and
 * against the embedded hub, side by side. The shared harness (`yjs-bench/bench.mjs`) takes one
 * server URL, and a cluster's figures need clients on different processes, so this driver does
 * what it does (stock y-websocket 3.1.0 `WebsocketProvider` clients over `ws`,
 * permessage-deflate offered, BroadcastChannel off, all in one Node process) with a URL per
 * client. It imports the harness's installed packages: bench_cluster.py copies it next to them.
 *
 *   node cluster_clients.mjs --scenario latency --url-a URL --url-b URL [--ops 500]
 *   node cluster_clients.mjs --scenario fanout --url-a URL --urls URL,URL [--clients 400] [--ops 200]
 *   node cluster_clients.mjs --scenario failover --url-a URL --url-b URL --kill-pid PID [--ops 200]
 *                            [--reconnect off]
 *   node cluster_clients.mjs --scenario sync --url-a URL --room DOC
 *
 * URLs are `ws://HOST:PORT/prefix?query`; the room is appended to the path.
 *   latency   A on url-a sets a key every 5 ms (--interval), B on url-b observes it: p50/p99 (ms)
 *   fanout    a writer on url-a sets --ops keys 1 ms apart; --clients readers, round-robin over
 *             --urls, receive them: delivered messages/s and the delay p50/p99 (ms)
 *   failover  a client on url-a sets --ops keys; the driver kills --kill-pid (kill -9, url-a's
 *             process), the client reconnects to url-b with its document (what a load balancer
 *             does): ms from the kill until it is synced there (`resynced_ms`), and until a new
 *             client on url-b holds every key (`complete_ms`); with `--reconnect off` the
 *             client stays away: what url-b's process finds in PostgreSQL and Redis alone
 *   sync      a new client on url-a (--room: a stored document no process has open): ms from
 *             its creation until it is synced (`sync_ms`), and the size of what it got
 *
 * Awareness is off: the figures are about document updates (400 clients with awareness cost
 * O(N^2) messages, which measures the clients). Prints one JSON line on stdout.
 */
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import { performance } from 'node:perf_hooks'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
const SCENARIO = args.scenario
const OPS = Number(args.ops ?? (SCENARIO === 'failover' ? 200 : SCENARIO === 'fanout' ? 200 : 500))
const CLIENTS = Number(args.clients ?? 400)
const INTERVAL = Number(args.interval ?? 5) // latency: ms between two edits
const TIMEOUT_S = Number(args.timeout ?? 120)
const room = args.room ?? `${SCENARIO}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`

const T0 = performance.now()
const deadline = T0 + TIMEOUT_S * 1000
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
const r3 = x => (x === null || x === undefined || Number.isNaN(x)) ? null : Math.round(x * 1000) / 1000

function pct (values) {
  const a = Float64Array.from(values).sort()
  const n = a.length
  if (n === 0) return { n: 0 }
  const q = p => a[Math.min(n - 1, Math.max(0, Math.ceil(p * n) - 1))]
  return { n, min: r3(a[0]), p50: r3(q(0.5)), p99: r3(q(0.99)), max: r3(a[n - 1]) }
}

class BenchWS extends WebSocket {
  constructor (address, protocols) {
    super(address, protocols, { perMessageDeflate: true, maxPayload: 1024 * 1024 * 1024 })
  }
}

const clients = []
let fatal = null

/** A provider for `doc` at `url` (its query string as params), not yet connected. */
function mkClient (url, doc = new Y.Doc()) {
  const u = new URL(url)
  const params = Object.fromEntries(u.searchParams)
  const base = `${u.protocol}//${u.host}${u.pathname}`.replace(/\/+$/, '')
  const p = new WebsocketProvider(base, room, doc, {
    connect: false, params, WebSocketPolyfill: BenchWS, disableBc: true, maxBackoffTime: 200
  })
  p.awareness.setLocalState(null)
  const c = { doc, p, synced: false, closes: 0 }
  p.on('sync', s => { if (s) c.synced = true })
  p.on('connection-close', () => { c.closes++ })
  p.on('closed', ({ code, reason }) => { fatal = `server closed a client for good: ${code} ${reason}` })
  clients.push(c)
  return c
}

async function until (pred, label, maxMs = Infinity) {
  const end = Math.min(deadline, performance.now() + maxMs)
  while (!pred()) {
    if (fatal) throw new Error(fatal)
    if (performance.now() > end) throw new Error(`timeout waiting for ${label}`)
    await sleep(1)
  }
}

async function connect (list, label) {
  for (const c of list) c.p.connect()
  await until(() => list.every(c => c.synced), label)
}

async function latency (R) {
  const A = mkClient(args['url-a'])
  const B = mkClient(args['url-b'])
  await connect([A, B], 'A and B to sync')
  await sleep(200)
  const sendT = new Float64Array(OPS)
  const recvT = new Float64Array(OPS).fill(NaN)
  R.received = 0
  B.doc.getMap('lat').observe(ev => {
    const now = performance.now()
    for (const k of ev.keysChanged) {
      const i = Number(k.slice(1))
      if (i >= 0 && i < OPS && Number.isNaN(recvT[i])) { recvT[i] = now; R.received++ }
    }
  })
  const m = A.doc.getMap('lat')
  for (let i = 0; i < OPS; i++) {
    sendT[i] = performance.now()
    m.set('k' + i, i)
    await sleep(INTERVAL)
  }
  try {
    await until(() => R.received === OPS, `B to receive ${OPS} edits`, 15000)
  } finally {
    const lat = []
    for (let i = 0; i < OPS; i++) if (!Number.isNaN(recvT[i])) lat.push(recvT[i] - sendT[i])
    R.latency_ms = pct(lat)
  }
  return R.received === OPS
}

async function fanout (R) {
  const urls = String(args.urls).split(',')
  const W = mkClient(args['url-a'])
  const readers = []
  for (let r = 0; r < CLIENTS; r++) readers.push(mkClient(urls[r % urls.length]))
  let t = performance.now()
  await connect([W], 'the writer to sync')
  for (let b = 0; b < CLIENTS; b += 50) await connect(readers.slice(b, b + 50), `readers ${b}.. to sync`)
  R.setup_ms = r3(performance.now() - t)
  await sleep(300)
  const sendT = new Float64Array(OPS)
  const lat = []
  R.expected = CLIENTS * OPS
  R.delivered = 0
  let lastRecv = NaN
  const seen = readers.map(() => new Uint8Array(OPS))
  readers.forEach((c, r) => {
    c.doc.getMap('fan').observe(ev => {
      const now = performance.now()
      for (const k of ev.keysChanged) {
        const i = Number(k.slice(1))
        if (!(i >= 0 && i < OPS) || seen[r][i]) continue
        seen[r][i] = 1
        lat.push(now - sendT[i])
        R.delivered++
        lastRecv = now
      }
    })
  })
  const m = W.doc.getMap('fan')
  t = performance.now()
  for (let i = 0; i < OPS; i++) {
    if (fatal) throw new Error(fatal)
    sendT[i] = performance.now()
    m.set('k' + i, i)
    await sleep(1)
  }
  try {
    await until(() => R.delivered === R.expected, `every reader to receive ${OPS} edits`, 60000)
  } finally {
    R.delivered_msgs_per_s = Number.isNaN(lastRecv) ? null : Math.round(R.delivered / ((lastRecv - t) / 1000))
    R.all_delivered_ms = R.delivered === R.expected ? r3(lastRecv - t) : null
    R.latency_ms = pct(lat)
  }
  return R.delivered === R.expected
}

async function failover (R) {
  const C = mkClient(args['url-a'])
  await connect([C], 'the client to sync on url-a')
  const m = C.doc.getMap('fo')
  for (let i = 0; i < OPS; i++) { m.set('k' + i, i); await sleep(1) }
  await sleep(50) // some updates committed, the last ones only relayed: as a kill would find them
  const t = performance.now()
  process.kill(Number(args['kill-pid']), 'SIGKILL')
  C.p.destroy() // the load balancer sends the reconnection elsewhere: same document, other URL
  if (args.reconnect !== 'off') {
    const again = mkClient(args['url-b'], C.doc)
    again.p.connect()
    await until(() => again.synced, 'the client to resync on url-b', 30000)
    R.resynced_ms = r3(performance.now() - t)
  }
  const probe = mkClient(args['url-b'])
  probe.p.connect()
  const keys = () => probe.doc.getMap('fo').size
  await until(() => probe.synced && keys() === OPS, `a new client on url-b to hold ${OPS} keys`, 30000)
  R.complete_ms = r3(performance.now() - t)
  R.keys = keys()
  return true
}

async function sync (R) {
  const t = performance.now()
  const C = mkClient(args['url-a'])
  await connect([C], 'a new client to sync')
  R.sync_ms = r3(performance.now() - t)
  R.update_bytes = Y.encodeStateAsUpdate(C.doc).length
  return R.update_bytes > 0
}

const R = { scenario: SCENARIO, ops: OPS }
const out = { ok: false, error: null, result: R }
process.setMaxListeners(0) // each provider adds a process 'exit' listener
try {
  const run = { latency, fanout, failover, sync }[SCENARIO]
  if (!run) throw new Error(`unknown scenario ${SCENARIO}`)
  out.ok = await run(R)
} catch (e) {
  out.error = e && e.message ? e.message : String(e)
}
out.wall_ms = r3(performance.now() - T0)
process.stdout.write(JSON.stringify(out) + '\n', () => {
  for (const c of clients) { try { c.p.destroy(); c.doc.destroy() } catch {} }
  setTimeout(() => process.exit(out.ok ? 0 : 1), 100)
})
