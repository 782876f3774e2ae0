"""The hub: a self-hosted server that keeps every space's documents, relays updates between
devices, and lets any Yjs client join (`/yjs/SPACE/DOC`). See docs/hub.md.

Modules: `accounts` (users, hashed tokens, spaces, limits), `docs` (HubDocs: the documents,
persisted, relayed once durable), `ywebsocket` (sans-I/O y-websocket rooms), `http` (the one
port: /health, /yjs, /peer), `server` (`peerdaemon hub serve`). The daemons' protocol on the
hub lives in `peers` (plugged in through `server.HubConfig.peer_endpoint`).
"""
