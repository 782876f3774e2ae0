#!/usr/bin/env node
/**
 * The hub's y-websocket endpoint with the real npm `yjs` and `y-websocket` packages (pinned in
 * package-lock.json). Driven by tests/test_hub_yjs_interop.py:
 *
 *   node hub_yjs.test.mjs --url ws://127.0.0.1:PORT/yjs/SPACE --room ENV_ID --token T [--device D]
 *                         --expect-name NAME --set-name NEW --body-prefix TEXT
 *
 * 1. joins the environment, waits until its Mockoon name (root map `environment`, key `name`,
 *    docs/model.md) is NAME: it sees what the daemon wrote;
 * 2. renames it to NEW and prepends TEXT to the first route's first response body (a Y.Text, a
 *    character-level edit), then waits until a second, fresh client sees both: the hub relays
 *    only what it stored, so that is the acknowledgement;
 * 3. tries a wrong token: it must get the auth message's permission-denied and a permanent
 *    close (4401), and no document data.
 *
 * Prints one JSON line; exit status 0 when every step held.
 */
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
const TIMEOUT_MS = Number(args.timeout || 15000)
const out = { ok: false, steps: {} }
const providers = []

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
async function until (pred, label) {
  const end = Date.now() + TIMEOUT_MS
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timeout: ${label}`)
    await sleep(10)
  }
}

function provider (token, doc = new Y.Doc()) {
  const p = new WebsocketProvider(args.url, args.room, doc, {
    params: args.device ? { token, device: args.device } : { token },
    WebSocketPolyfill: WebSocket,
    disableBc: true,
    maxBackoffTime: 500
  })
  providers.push(p)
  return p
}

function firstBody (doc) {
  const order = doc.getArray('routes.order').toArray()
  const route = doc.getMap('routes').get(order[0])
  const responses = route.get('responses')
  const first = route.get('responses.order').toArray()[0]
  return responses.get(first).get('body')
}

try {
  // 1. read what the daemon wrote
  const a = provider(args.token)
  await until(() => a.synced, 'first client synced')
  const env = a.doc.getMap('environment')
  await until(() => env.get('name') === args['expect-name'], `name ${args['expect-name']}`)
  out.steps.seen = { name: env.get('name'), routes: a.doc.getMap('routes').size }

  // 2. edit, and wait until a fresh client holds the edit (relayed = stored by the hub)
  a.doc.transact(() => {
    env.set('name', args['set-name'])
    firstBody(a.doc).insert(0, args['body-prefix'])
  })
  const b = provider(args.token)
  await until(() => b.synced && b.doc.getMap('environment').get('name') === args['set-name'] &&
    firstBody(b.doc).toString().startsWith(args['body-prefix']), 'second client sees the edit')
  out.steps.edited = { name: b.doc.getMap('environment').get('name') }

  // 3. a wrong token gets permission-denied and a close, never data
  const denied = { messages: [], close: null }
  const bad = provider('not-a-token')
  bad.messageHandlers = bad.messageHandlers.map((h, type) => (enc, dec, prov, emitSynced, mt) => {
    denied.messages.push(type)
    return h(enc, dec, prov, emitSynced, mt)
  })
  bad.on('closed', ({ code, reason }) => { denied.close = { code, reason } })
  const warn = console.warn
  console.warn = (...m) => { denied.warning = String(m[0]).split('\n').slice(-1)[0] }
  await until(() => denied.close !== null, 'the wrong token to be closed')
  console.warn = warn
  out.steps.denied = {
    ...denied,
    synced: bad.synced,
    roots: Array.from(bad.doc.share.keys()).filter(k => bad.doc.share.get(k)._start || bad.doc.share.get(k)._map.size)
  }
  out.ok = denied.close.code === 4401 && denied.close.reason === 'unauthorized' &&
    denied.messages.every(t => t === 2) && denied.messages.length === 1 &&
    denied.warning === 'unauthorized' && !bad.synced && out.steps.denied.roots.length === 0
  if (!out.ok) out.error = 'the wrong token got something else than permission-denied and a close'
} catch (e) {
  out.error = e && e.message ? e.message : String(e)
}
process.stdout.write(JSON.stringify(out) + '\n', () => {
  for (const p of providers) { try { p.destroy() } catch {} }
  setTimeout(() => process.exit(out.ok ? 0 : 1), 50)
})
