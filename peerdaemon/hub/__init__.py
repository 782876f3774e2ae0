"""The hub: a self-hosted server that keeps every space's documents, relays updates between
devices, and lets any Yjs client join (`/yjs/SPACE/DOC`). See docs/hub.md.

Read top-down:

- `server`: `peerdaemon hub serve`, its config and wiring.
- `http`: the one port (`HubHttp`): admission, then `/health`, `/yjs/...` or `/peer`.
- `admission`: connections not authenticated yet: slots, `503 busy`, the handshake deadline.
- `yjs`: the `/yjs` endpoint, the shell that acts on the rooms' events (stores updates, wakes
  writers); `yauth`: its auth rules; `ywebsocket`: the rooms, without I/O.
- `peer_socket`: the `/peer` websocket handed to the daemons' protocol (`peers`, plugged in
  through `server.HubConfig.peer_endpoint`).
- `transport`: HTTP/1.1 (h11), the upgrade and one websocket's reader, writer and
  timer over a trio stream; `wsconn`: that websocket's core, without I/O (keep-alive,
  handshake deadline, too-slow).
- `docs`: HubDocs, the documents, persisted, relayed at once, stored alongside; `accounts`: users, hashed
  tokens, spaces, limits.
- `cloudmock`: the Cloud Mock, loaded on first use: `mocks` (what is hosted, the runner),
  `mockproxy` and `mockgate` (`/mock/SPACE/ENV/...`).
"""
