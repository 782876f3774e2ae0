#!/usr/bin/env node
/**
 * Presence through the hub with the real npm `yjs` and `y-websocket` (their y-protocols
 * awareness). Driven by tests/test_presence_hub.py:
 *
 *   node presence.test.mjs --url ws://127.0.0.1:PORT/yjs/SPACE --room DOC --token T
 *                          --name NAME --color COLOR --expect-device DEVICE_ID
 *
 * 1. joins DOC and publishes its awareness state `{user: {name, color}}`, as web editors do;
 * 2. waits until the awareness holds a state whose `device.id` is DEVICE_ID (a daemon's, relayed
 *    by the hub) and prints it as one JSON line `{"seen": STATE, "client": OWN CLIENT ID}`;
 * 3. stays until its stdin closes (the test reads the daemon's presence meanwhile), then leaves
 *    cleanly, and prints `{"ok": true}`.
 */
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
const TIMEOUT_MS = Number(args.timeout || 20000)

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
async function until (pred, label) {
  const end = Date.now() + TIMEOUT_MS
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timeout: ${label}`)
    await sleep(10)
  }
}

const doc = new Y.Doc()
const provider = new WebsocketProvider(args.url, args.room, doc, {
  params: { token: args.token },
  WebSocketPolyfill: WebSocket,
  disableBc: true,
  maxBackoffTime: 500
})
try {
  provider.awareness.setLocalStateField('user', { name: args.name, color: args.color })
  let seen = null
  await until(() => {
    for (const state of provider.awareness.getStates().values()) {
      if (state && state.device && state.device.id === args['expect-device']) seen = state
    }
    return seen !== null
  }, `the daemon ${args['expect-device']} in the awareness`)
  console.log(JSON.stringify({ seen, client: doc.clientID }))
  await new Promise(resolve => {
    process.stdin.on('end', resolve)
    process.stdin.on('close', resolve)
    process.stdin.resume()
  })
  provider.awareness.setLocalState(null)
  await sleep(100)
  provider.destroy()
  console.log(JSON.stringify({ ok: true }))
  process.exit(0)
} catch (err) {
  console.log(JSON.stringify({ ok: false, error: String(err && err.stack || err) }))
  provider.destroy()
  process.exit(1)
}
