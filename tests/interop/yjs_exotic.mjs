#!/usr/bin/env node
/**
 * Yjs content that pycrdt cannot make, made by the real npm `yjs` (pinned in package-lock.json),
 * for tests/test_mockoon_schema_interop.py: a peer running yjs can send any of it.
 *
 *   node yjs_exotic.mjs [BASE_UPDATE_FILE]
 *
 * Each case is played on a fresh replica of the base document (the update in BASE_UPDATE_FILE,
 * or an empty document), at the layout's roots and inside the first route and its first
 * response (docs/model.md). Prints one JSON object: case name -> base64 update (the case only).
 */
import { readFileSync } from 'node:fs'
import * as Y from 'yjs'

const base = process.argv[2] ? new Uint8Array(readFileSync(process.argv[2])) : null

function firstEntity (map) {
  const keys = [...map.keys()].sort()
  for (const k of keys) if (map.get(k) instanceof Y.Map) return map.get(k)
  return null
}

// nests one integrated level at a time (a preliminary tree this deep overflows yjs's stack)
function deepen (top, depth, array) {
  let node = top
  for (let i = 0; i < depth; i++) {
    const child = array ? new Y.Array() : new Y.Map()
    if (array) node.push([child]); else node.set('n', child)
    node = child
  }
}

const U1 = '44444444-4444-4444-8444-444444444444'
const cases = {
  undefined (doc) {
    const env = doc.getMap('environment')
    env.set('port', undefined)
    env.set('name', undefined)
    env.set('custom', { a: undefined, b: [undefined, 1] })
    // (yjs cannot push a bare undefined into an array; inside a plain value it can)
    doc.getArray('rootChildren').push([[undefined], { type: 'route', uuid: undefined }])
    doc.getArray('routes.order').push([[undefined]])
    const route = firstEntity(doc.getMap('routes'))
    if (route) { route.set('endpoint', undefined); route.set('responses', undefined) }
  },
  bigint (doc) {
    const env = doc.getMap('environment')
    env.set('port', 3000n)
    env.set('latency', 2n ** 63n - 1n)
    env.set('lastMigration', 33n)
    env.set('custom', { n: -(2n ** 63n), list: [1n, 2n ** 70n] })
    const route = firstEntity(doc.getMap('routes'))
    const response = route && route.get('responses') instanceof Y.Map ? firstEntity(route.get('responses')) : null
    if (response) { response.set('statusCode', 200n); response.set('latency', 1n) }
  },
  uint8array (doc) {
    const env = doc.getMap('environment')
    env.set('name', new Uint8Array([0, 255, 1]))
    env.set('headers', new Uint8Array([1]))
    env.set('custom', { bytes: new Uint8Array([7]), list: [new Uint8Array(0)] })
    doc.getArray('rootChildren').push([new Uint8Array([2])])
    const route = firstEntity(doc.getMap('routes'))
    if (route) route.set('documentation', new Uint8Array([104, 105]))
  },
  numbers (doc) {
    const env = doc.getMap('environment')
    env.set('port', NaN)
    env.set('latency', -0)
    env.set('lastMigration', Infinity)
    env.set('custom', [NaN, Infinity, -Infinity, 2 ** 60, Number.MAX_VALUE, Number.MIN_VALUE])
  },
  'text-formats-and-embeds' (doc) {
    const env = doc.getMap('environment')
    const name = new Y.Text()
    env.set('name', name)
    name.insert(0, 'API', { bold: true })
    name.insertEmbed(1, { image: 'x.png' }, { link: 'y' })
    name.insertEmbed(0, new Y.Map()) // a shared type as an embed
    name.format(0, 3, { italic: true, color: null })
    name.insert(2, 'z', { bold: null })
    const route = firstEntity(doc.getMap('routes'))
    if (route) {
      const text = route.get('documentation')
      if (text instanceof Y.Text) {
        text.format(0, text.length, { bold: true })
        text.insertEmbed(0, { formula: 'x' })
      } else {
        route.set('documentation', new Y.Text('d'))
      }
      const response = route.get('responses') instanceof Y.Map ? firstEntity(route.get('responses')) : null
      const body = response && response.get('body')
      if (body instanceof Y.Text) {
        body.applyDelta([{ insert: 'q', attributes: { bold: true } }, { insert: { embed: 1 } }])
      }
    }
  },
  'xml-types-in-maps' (doc) {
    const env = doc.getMap('environment')
    const el = new Y.XmlElement('p')
    el.setAttribute('a', 'b')
    el.insert(0, [new Y.XmlText('t')])
    env.set('name', el)
    env.set('hostname', new Y.XmlText('h'))
    env.set('tlsOptions', new Y.XmlFragment())
    const route = firstEntity(doc.getMap('routes'))
    if (route) {
      route.set('endpoint', new Y.XmlText('e'))
      route.set('responses.order', new Y.XmlElement('x'))
    }
    doc.getArray('rootChildren').push([new Y.XmlElement('route')])
    doc.getArray('folders.order').push([new Y.XmlText('f')])
  },
  'xml-hook' (doc) {
    // a Y.XmlHook (deprecated, still in yjs): yrs cannot decode it, so a daemon refuses it whole
    doc.getMap('environment').set('hook', new Y.XmlHook('hook'))
  },
  'roots-as-other-types' (doc) {
    doc.getText('routes.order').insert(0, 'abc', { bold: true })
    doc.getXmlFragment('rootChildren').insert(0, [new Y.XmlElement('p')])
    doc.getArray('meta').push([1, 'absent'])
    doc.getText('callbacks').insert(0, 'cb')
  },
  'text-in-array-roots' (doc) {
    // characters in the roots read as arrays, beyond ASCII: they hang yrs (model/strays.py)
    for (const name of ['routes.order', 'folders.order', 'data.order', 'callbacks.order', 'rootChildren']) {
      const text = doc.getText(name)
      text.insert(0, '\u00cba\u{1F600}')
      text.insert(0, 'b')
      text.insert(text.length, '\u00e9', { bold: true })
      text.insertEmbed(1, { e: 1 })
    }
  },
  'lone-surrogates' (doc) {
    const env = doc.getMap('environment')
    env.set('name', 'a\ud800b')
    env.set('\udc00', 'key with a lone surrogate')
    env.set('custom', { '\ud800': '\udfff' })
    doc.getMap('routes').set('\ud83d', new Y.Map([['endpoint', 'x']]))
    doc.getArray('routes.order').push(['\ud83d'])
  },
  subdocs (doc) {
    doc.getMap('environment').set('sub', new Y.Doc({ guid: 'sub-1' }))
    doc.getArray('rootChildren').push([new Y.Doc({ guid: 'sub-2' })])
    doc.getMap('routes').set(U1, new Y.Doc({ guid: 'sub-3' }))
    doc.getArray('routes.order').push([U1])
  },
  'deep-nesting' (doc) {
    deepen(doc.getMap('environment').set('deep', new Y.Map()), 1200, false)
    doc.getArray('rootChildren').push([new Y.Array()])
    deepen(doc.getArray('rootChildren').get(doc.getArray('rootChildren').length - 1), 1200, true)
    const route = firstEntity(doc.getMap('routes'))
    if (route) deepen(route.set('responses', new Y.Map()), 1200, false)
  },
  'plain-objects-everywhere' (doc) {
    doc.getMap('routes').set(U1, { uuid: U1, endpoint: 'plain', responses: [] })
    doc.getArray('routes.order').push([U1])
    doc.getArray('rootChildren').push([{ type: 'route', uuid: U1 }, { type: 'route', uuid: U1 }])
    doc.getMap('folders').set(U1, { children: 'x' }) // same uuid as the route
    doc.getMap('meta').set('absent', { routes: true })
    doc.getMap('environment').set('lastMigration', '33')
  },
  'deleted-content' (doc) {
    // ContentDeleted / GC: add then delete, and delete what the base holds
    const env = doc.getMap('environment')
    env.set('tmp', new Y.Map([['a', 1]]))
    env.delete('tmp')
    env.delete('name')
    env.delete('uuid')
    const routes = doc.getMap('routes')
    for (const k of [...routes.keys()].slice(0, 2)) routes.delete(k)
    const route = firstEntity(routes)
    if (route) { route.delete('responses'); route.delete('uuid') }
    doc.getArray('rootChildren').delete(0, Math.min(1, doc.getArray('rootChildren').length))
  }
}

const out = {}
for (const [name, play] of Object.entries(cases)) {
  const doc = new Y.Doc()
  if (base) Y.applyUpdate(doc, base)
  const before = Y.encodeStateVector(doc)
  doc.transact(() => play(doc))
  out[name] = Buffer.from(Y.encodeStateAsUpdate(doc, before)).toString('base64')
}
process.stdout.write(JSON.stringify(out) + '\n')
