#!/usr/bin/env node
/**
 * Clients of one room spread over the processes of a hub cluster, with the real npm `yjs` and
 * `y-websocket` (issue 14). Driven by tests/test_cluster_hub.py:
 *
 *   node cluster_yjs.mjs --urls ws://HOST:P1/yjs/SPACE,ws://HOST:P2/yjs/SPACE --room DOC
 *                        --token T [--device D] [--edits N]
 *
 * One provider per URL; each sets its awareness state, then makes N edits (a character of its
 * own appended to the shared Y.Text `text`, a key of its own in the Y.Map `keys`), in small
 * bursts. Every provider must end with the same document holding every edit, and see every
 * other provider's awareness state. Prints one JSON line; exit status 0 when that held.
 */
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
const TIMEOUT_MS = Number(args.timeout || 20000)
const EDITS = Number(args.edits || 50)
const urls = args.urls.split(',')
const out = { ok: false }

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
async function until (pred, label) {
  const end = Date.now() + TIMEOUT_MS
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timeout: ${label}`)
    await sleep(10)
  }
}

const providers = urls.map((url, i) => {
  const doc = new Y.Doc()
  const p = new WebsocketProvider(url, args.room, doc, {
    params: args.device ? { token: args.token, device: args.device } : { token: args.token },
    WebSocketPolyfill: WebSocket,
    disableBc: true,
    maxBackoffTime: 500
  })
  p.awareness.setLocalState({ user: { name: `client-${i}` } })
  return p
})

try {
  await until(() => providers.every(p => p.synced), 'every provider synced')
  for (let n = 0; n < EDITS; n++) {
    providers.forEach((p, i) => {
      p.doc.getText('text').insert(0, String.fromCharCode(97 + i))
      p.doc.getMap('keys').set(`c${i}-${n}`, n)
    })
    if (n % 10 === 9) await sleep(5)
  }
  const total = EDITS * providers.length
  const texts = () => providers.map(p => p.doc.getText('text').toString())
  await until(() => texts().every(t => t.length === total && t === texts()[0]), 'texts converge')
  await until(() => providers.every(p => p.doc.getMap('keys').size === total), 'keys converge')
  const names = p => [...p.awareness.getStates().values()].map(s => s.user && s.user.name).filter(Boolean)
  await until(() => providers.every(p => names(p).length === providers.length), 'awareness')
  out.text = texts()[0]
  out.keys = providers[0].doc.getMap('keys').size
  out.awareness = names(providers[0]).sort()
  out.ok = true
} catch (err) {
  out.error = String(err && err.message ? err.message : err)
  out.texts = providers.map(p => p.doc.getText('text').length)
  out.keys = providers.map(p => p.doc.getMap('keys').size)
} finally {
  for (const p of providers) p.destroy()
  console.log(JSON.stringify(out))
  process.exit(out.ok ? 0 : 1)
}
