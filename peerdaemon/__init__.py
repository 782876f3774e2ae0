"""peerdaemon: local-first, lossless sync of Mockoon environments as Yjs CRDT documents."""

__version__ = "0.1.0"
