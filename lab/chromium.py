"""Debian's headless Chromium, launched so that it can reach nothing but this machine.

Chromium phones home even with `--disable-background-networking` (update, accounts and autofill
lookups were caught by ../shared/tools/leakcheck), so every name but the ones a caller maps is
answered NOTFOUND inside the browser: no DNS query leaves it, whatever a component wants.
Shared by tests/test_status_page.py and benchmarks/bench_status.py (lab/: what both use).
"""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"


def chromium_args(*, maps: dict[str, str] | None = None) -> list[str]:
    """Command-line switches; `maps` names resolved to a loopback address (all else: NOTFOUND)."""
    rules = [f"MAP {name} {address}" for name, address in (maps or {}).items()]
    rules += ["MAP * ~NOTFOUND", "EXCLUDE localhost", "EXCLUDE 127.0.0.1", "EXCLUDE [::1]"]
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-pings",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--disable-features=AutofillServerCommunication,OptimizationHints,MediaRouter,Translate",
        "--host-resolver-rules=" + ", ".join(rules),
    ]
