#!/usr/bin/env node
/**
 * Many idle y-websocket connections on one server: are they all served, what do they cost it,
 * and does a new client still sync fast while they are there? `bench_hub.py` runs it (scenario
 * `idle10k`) against the hub and against the Node reference server, side by side.
 *
 * The shared harness (`yjs-bench/bench.mjs`) stops at 5,000 clients and keeps no connection
 * open once its scenario ends, so this driver does the same thing it does (stock y-websocket
 * 3.1.0 `WebsocketProvider` clients over `ws`, permessage-deflate offered, BroadcastChannel
 * off, all in one Node process) for this one figure. It imports the harness's installed
 * packages: bench_hub.py copies it next to them (a `node_modules` link).
 *
 *   node hub_idle.mjs --url ws://127.0.0.1:PORT[/prefix] [--query token=T] --server-pid PID
 *                     [--clients 10000] [--batch 200] [--probes 100] [--awareness off]
 *
 * 1. `--clients` readers connect in batches of `--batch`, each batch waiting until every one
 *    of its clients synced. A client whose first attempt fails (refused, e.g. `503 busy`, or
 *    closed before its sync) is counted in `refused_first_try`; its provider retries, as it
 *    would in a browser, and `served` counts those that synced in the end.
 * 2. Once the server went quiet: its RSS (`server.vm_rss_kb`) and peak (`vm_hwm_kb`).
 * 3. `--probes` new clients, one at a time, each timed from its creation to its `synced`
 *    event, then closed: in the crowded room (`probe_ms`) and in a room of their own
 *    (`probe_other_room_ms`).
 *
 * Awareness is off by default: every client's awareness state goes to every other client of
 * the room (both servers relay it to the whole room), so N clients in one room with awareness
 * cost O(N^2) messages, which measures the clients, not idle connections.
 *
 * Prints one JSON line on stdout (`ok`, `error`, `result`, `server`, `client_process`).
 */
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import { readFileSync } from 'node:fs'
import { performance } from 'node:perf_hooks'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) {
  const k = process.argv[i].replace(/^--/, '')
  args[k] = process.argv[i + 1]
}
const N = Number(args.clients ?? 10000)
const BATCH = Number(args.batch ?? 200)
const PROBES = Number(args.probes ?? 100)
const TIMEOUT_S = Number(args.timeout ?? 180)
const AWARENESS = ['on', 'true', '1'].includes(String(args.awareness ?? 'off'))
const PID = args['server-pid'] ? Number(args['server-pid']) : null
const params = Object.fromEntries(new URLSearchParams(args.query ?? ''))
const room = args.room ?? `idle-${Date.now().toString(36)}`
const url = String(args.url).replace(/\/+$/, '')

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

function procInfo (pid) {
  if (!pid) return null
  try {
    const s = readFileSync(`/proc/${pid}/status`, 'utf8')
    const kb = k => { const m = new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s); return m ? Number(m[1]) : null }
    return { vm_hwm_kb: kb('VmHWM'), vm_rss_kb: kb('VmRSS') }
  } catch (e) {
    return { error: `cannot read /proc/${pid}: ${e.code || e.message}` }
  }
}

class BenchWS extends WebSocket {
  constructor (address, protocols) {
    super(address, protocols, { perMessageDeflate: true, maxPayload: 1024 * 1024 * 1024 })
  }
}

let totalIn = 0
const codes = {}

function mkClient (roomName) {
  const doc = new Y.Doc()
  const p = new WebsocketProvider(url, roomName, doc, {
    connect: false, params, WebSocketPolyfill: BenchWS, disableBc: true, maxBackoffTime: 1000
  })
  p.awareness.setLocalState(AWARENESS ? { user: { name: 'idle' } } : null)
  const c = { doc, p, failedFirst: false, synced: false, attempts: 0 }
  p.messageHandlers = p.messageHandlers.map(h => (...a) => { totalIn++; return h(...a) })
  p.on('sync', s => { if (s) c.synced = true })
  const fail = () => { if (!c.synced) c.failedFirst = true }
  p.on('connection-error', fail)
  p.on('connection-close', ev => {
    if (ev) codes[ev.code] = (codes[ev.code] || 0) + 1
    fail()
  })
  return c
}

async function until (pred, label) {
  while (!pred()) {
    if (performance.now() > deadline) throw new Error(`timeout waiting for ${label}`)
    await sleep(2)
  }
}

async function settle (quietMs = 300, maxMs = 10000) {
  const t0 = performance.now()
  let last = totalIn
  let lastChange = t0
  while (performance.now() - t0 < maxMs) {
    await sleep(20)
    if (totalIn !== last) { last = totalIn; lastChange = performance.now() } else if (performance.now() - lastChange >= quietMs) break
  }
}

async function probe (roomName) {
  const c = mkClient(roomName)
  const t = performance.now()
  c.p.connect()
  await until(() => c.synced, 'a probe to sync')
  const ms = performance.now() - t
  c.p.destroy()
  c.doc.destroy()
  return ms
}

const R = { clients: N, batch: BATCH, awareness: AWARENESS }
const out = { ok: false, error: null, result: R, server: null, client_process: null }
const clients = []
process.setMaxListeners(0) // each provider adds a process 'exit' listener
try {
  const start = performance.now()
  for (let b = 0; b < N; b += BATCH) {
    const batch = []
    for (let i = b; i < Math.min(N, b + BATCH); i++) batch.push(mkClient(room))
    clients.push(...batch)
    for (const c of batch) c.p.connect()
    await until(() => batch.every(c => c.synced), `clients ${b}.. to sync`)
  }
  R.connect_all_ms = r3(performance.now() - start)
  R.served = clients.filter(c => c.synced).length
  R.refused_first_try = clients.filter(c => c.failedFirst).length
  R.close_codes = { ...codes }
  await settle()
  out.server = procInfo(PID)
  const same = []
  const other = []
  for (let i = 0; i < PROBES; i++) {
    same.push(await probe(room))
    other.push(await probe(`${room}-probe-${i}`))
  }
  R.probe_ms = pct(same)
  R.probe_other_room_ms = pct(other)
  out.ok = R.served === N
  if (!out.ok) out.error = `${N - R.served} client(s) never synced`
} catch (e) {
  out.error = e && e.message ? e.message : String(e)
  R.served = clients.filter(c => c.synced).length
  R.refused_first_try = clients.filter(c => c.failedFirst).length
  R.close_codes = { ...codes }
}
out.server = { ...(procInfo(PID) ?? {}), rss_after_connect_kb: out.server?.vm_rss_kb ?? null }
out.client_process = { max_rss_kb: process.resourceUsage().maxRSS }
out.wall_ms = r3(performance.now() - T0)
process.stdout.write(JSON.stringify(out) + '\n', () => {
  for (const c of clients) { try { c.p.destroy(); c.doc.destroy() } catch {} }
  setTimeout(() => process.exit(out.ok ? 0 : 1), 100)
})
