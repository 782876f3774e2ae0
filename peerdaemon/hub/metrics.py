"""The hub's `/metrics`: Prometheus' text exposition format (version 0.0.4), without I/O.

`render(families)` writes metric families (counters, gauges, histograms: HELP and TYPE lines,
then the samples, label values escaped); `hub_families(snapshot)` turns the hub's figures, a
plain dict that `HubHttp.metrics_snapshot` gathers on each scrape, into the hub's families
(names and meanings: docs/hub.md, "Metrics"). `EventCounts` counts events of the event log by
one of their fields (the `limit-exceeded` refusals by reason). `parse` reads the format back
(`hub status` reads a running hub's figures with it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "EventCounts",
    "Family",
    "Histogram",
    "by_label",
    "hub_families",
    "parse",
    "render",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

KINDS = ("counter", "gauge", "histogram")
_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Labels = Mapping[str, str]


@dataclass(frozen=True)
class Histogram:
    """One histogram's value: `counts[i]` observations fell at or below `bounds[i]` (and above
    the bound before: not cumulative); `counts` may hold one more, those past the last bound."""

    bounds: Sequence[float]
    counts: Sequence[int]
    count: int
    sum: float


Value = int | float | Histogram


@dataclass(frozen=True)
class Family:
    """A metric family: its name (a counter's ends in `_total`), kind, help text, samples."""

    name: str
    kind: str
    help: str
    samples: Sequence[tuple[Labels, Value]] = field(default_factory=tuple)


def single(value: Value) -> list[tuple[Labels, Value]]:
    return [({}, value)]


def by_label(label: str, values: Mapping[str, Value]) -> list[tuple[Labels, Value]]:
    """One sample per key, labelled `label="key"`, in key order."""
    return [({label: str(key)}, values[key]) for key in sorted(values)]


# -- rendering ---------------------------------------------------------------------------------
def render(families: Iterable[Family]) -> str:
    out: list[str] = []
    seen: set[str] = set()
    for family in families:
        name = family.name
        if not _NAME_RE.fullmatch(name) or name in seen:
            raise ValueError(f"bad or repeated metric name {name!r}")
        if family.kind not in KINDS:
            raise ValueError(f"{name}: unknown kind {family.kind!r}")
        seen.add(name)
        out.append(f"# HELP {name} {_escape_help(family.help)}")
        out.append(f"# TYPE {name} {family.kind}")
        for labels, value in family.samples:
            if family.kind == "histogram":
                if not isinstance(value, Histogram):
                    raise ValueError(f"{name}: a histogram's sample must be a Histogram")
                _histogram_lines(out, name, labels, value)
            else:
                if isinstance(value, Histogram):
                    raise ValueError(f"{name}: a {family.kind} takes a number")
                out.append(f"{name}{_labels(labels)} {_number(value)}")
    return "\n".join(out) + "\n" if out else ""


def _histogram_lines(out: list[str], name: str, labels: Labels, h: Histogram) -> None:
    if "le" in labels:
        raise ValueError(f"{name}: 'le' is the histogram's own label")
    if len(h.counts) not in (len(h.bounds), len(h.bounds) + 1):
        raise ValueError(f"{name}: {len(h.counts)} counts for {len(h.bounds)} bounds")
    cumulative = 0
    for bound, n in zip(h.bounds, h.counts, strict=False):
        cumulative += n
        le = {**labels, "le": _number(float(bound))}
        out.append(f"{name}_bucket{_labels(le)} {cumulative}")
    out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {h.count}")
    out.append(f"{name}_sum{_labels(labels)} {_number(h.sum)}")
    out.append(f"{name}_count{_labels(labels)} {h.count}")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels.items():
        if not _LABEL_RE.fullmatch(key) or key.startswith("__"):
            raise ValueError(f"bad label name {key!r}")
        parts.append(f'{key}="{escape_label_value(str(value))}"')
    return "{" + ",".join(parts) + "}"


def escape_label_value(value: str) -> str:
    """A label value inside its double quotes: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: int | float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


# -- the hub's families ------------------------------------------------------------------------
P = "peerdaemon_hub_"

MOCK_STATES = ("waiting", "starting", "running", "error", "unavailable", "refused")
"""A hosted Cloud Mock's state: `waiting` for its environment's document, then the engine's
(`starting`, `running`, `error`, `unavailable`), or `refused` by a limit."""

LIMIT_REASONS = ("quota-exceeded", "environment-too-large")
"""The `limit-exceeded` reasons (of HubDocs); always listed, at 0 until one happens."""


def hub_families(snap: Mapping[str, Any]) -> list[Family]:
    """The hub's metric families from a snapshot (see `HubHttp.metrics_snapshot`); a key that
    is missing leaves its family out."""
    out: list[Family] = []

    def add(name: str, kind: str, help: str, samples: Sequence[tuple[Labels, Value]]) -> None:
        out.append(Family(P + name, kind, help, samples))

    def one(key: str, name: str, kind: str, help: str) -> None:
        if key in snap:
            add(name, kind, help, single(snap[key]))

    if "version" in snap:
        add("info", "gauge", "The hub's version.", [({"version": str(snap["version"])}, 1)])
    one("start_time", "start_time_seconds", "gauge", "When the hub started (Unix time).")
    if "connections" in snap:
        add(
            "connections",
            "gauge",
            "Open connections by kind: yjs (y-websocket clients), peer (daemons on /peer), "
            "mock (Cloud Mock requests and relayed WebSockets).",
            by_label("kind", snap["connections"]),
        )
    one(
        "half_open",
        "half_open_connections",
        "gauge",
        "Connections not authenticated (or answered) yet, every path.",
    )
    one(
        "busy_refusals",
        "busy_refusals_total",
        "counter",
        "Connections refused with 503 busy (max_half_open or max_half_open_per_ip reached).",
    )
    one("rooms", "rooms", "gauge", "y-websocket rooms (documents with a client connected).")
    one("spaces", "spaces", "gauge", "Spaces holding at least one document.")
    one("documents", "documents", "gauge", "Documents stored (space documents included).")
    one(
        "documents_loaded",
        "documents_loaded",
        "gauge",
        "Documents whose content is in memory (of those stored): loaded when used, dropped "
        "after two idle checkpoints (store.sweep_interval) unless a client holds them open.",
    )
    one(
        "documents_evicted",
        "documents_evicted_total",
        "counter",
        "Documents dropped from memory by an idle checkpoint (they stay stored).",
    )
    one(
        "stored_bytes",
        "stored_bytes",
        "gauge",
        "Bytes the documents take in the store: snapshots plus the updates logged since.",
    )
    one(
        "relay_queued",
        "relay_queued_updates",
        "gauge",
        "Updates applied (and relayed) whose commit is not confirmed yet.",
    )
    one(
        "updates_relayed",
        "updates_relayed_total",
        "counter",
        "Document updates relayed (to rooms, daemons and Cloud Mocks).",
    )
    one("relayed_bytes", "relayed_bytes_total", "counter", "Bytes of the updates relayed.")
    if "store_commit" in snap:
        add(
            "store_commit_seconds",
            "histogram",
            "Time one group commit of the store took (a batch of writes, fsync included).",
            single(snap["store_commit"]),
        )
    if "limit_refusals" in snap:
        refusals = {reason: 0 for reason in LIMIT_REASONS} | dict(snap["limit_refusals"])
        add(
            "limit_refusals_total",
            "counter",
            "Updates refused by a limit (limit-exceeded events), by reason.",
            by_label("reason", refusals),
        )
    one(
        "mock_requests",
        "mock_requests_total",
        "counter",
        "Requests the Cloud Mocks' engine served.",
    )
    if "hosted_mocks" in snap:
        states = {state: 0 for state in MOCK_STATES} | dict(snap["hosted_mocks"])
        add("hosted_mocks", "gauge", "Hosted Cloud Mocks by state.", by_label("state", states))
    out += _cluster_families(snap)
    return out


def _cluster_families(snap: Mapping[str, Any]) -> list[Family]:
    """A process of a cluster (docs/hub.md, "Scaled mode"): absent from an embedded hub's."""
    if "cluster_process" not in snap:
        return []
    out = [
        Family(
            P + "cluster_info",
            "gauge",
            "This process's name on the bus (its entries' origin, its heartbeat).",
            [({"process": str(snap["cluster_process"])}, 1)],
        )
    ]
    for key, kind, help in (
        ("redis_up", "gauge", "1 if Redis answered this process's last check (every second)."),
        ("postgres_up", "gauge", "1 if PostgreSQL answered this process's last check."),
        ("rooms_followed", "gauge", "Rooms whose streams this process reads: its rooms with "
         "clients and the documents its daemons sync."),
        ("rooms_loading", "gauge", "Rooms whose clients wait for the document to load from "
         "PostgreSQL."),
        ("queued_commits", "gauge", "Updates this process relayed and queued for PostgreSQL, "
         "not committed yet (not accepted yet)."),
        ("oldest_commit_wait", "gauge", "Seconds the oldest of those has waited."),
        ("queued_publishes", "gauge", "Entries waiting to be appended to the Redis streams."),
        ("bus_lag", "gauge", "Seconds from an entry's append to Redis to this process reading "
         "it, for the last entries read (Redis' clock against this process's)."),
        ("remote_updates", "counter", "Updates of other processes read from the bus and applied."),
        ("resyncs", "counter", "Redis found restarted empty (a new epoch): rooms resynced."),
        ("repairs", "counter", "Processes found dead whose uncommitted updates this one stored."),
        ("kicks", "counter", "Accounts changes announced on the bus (revocations, removals)."),
        ("readded", "counter", "Updates appended to their stream again after a long commit."),
        ("read_restarts", "counter", "Times the blocking read of the streams started again "
         "(rooms opening or closing, batched)."),
        ("compactions", "counter", "Documents this process compacted (under the room's lock)."),
        ("sync_loads", "counter", "Documents read from PostgreSQL in the event loop (a last "
         "resort: holds up every room for the query)."),
    ):  # fmt: skip
        name = "cluster_" + key
        if name not in snap:
            continue
        suffix = "_seconds" if key in ("bus_lag", "oldest_commit_wait") else ""
        suffix += "_total" if kind == "counter" else ""
        out.append(Family(P + name + suffix, kind, help, single(snap[name])))
    return out


class EventCounts:
    """An event log listener that counts events of one type by one of their data fields."""

    def __init__(self, type_: str, key: str) -> None:
        self.type = type_
        self.key = key
        self.counts: dict[str, int] = {}

    def __call__(self, event: Mapping[str, Any]) -> None:
        if event.get("type") == self.type:
            value = str(event.get("data", {}).get(self.key, ""))
            self.counts[value] = self.counts.get(value, 0) + 1


# -- reading it back ---------------------------------------------------------------------------
_SAMPLE_RE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+-?\d+)?"
)
_PAIR_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of an exposition: (name, sorted label pairs) -> value. ValueError on a line that
    is neither a comment nor a sample."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.split("\n"):
        if not line.strip() or line.startswith("#"):
            continue
        m = _SAMPLE_RE.fullmatch(line.strip())
        if m is None:
            raise ValueError(f"not a sample: {line!r}")
        labels: list[tuple[str, str]] = []
        rest = m.group("labels") or ""
        while rest.strip():
            pair = _PAIR_RE.match(rest)
            if pair is None:
                raise ValueError(f"bad labels: {line!r}")
            labels.append((pair.group(1), _unescape(pair.group(2))))
            rest = rest[pair.end() :]
        out[(m.group("name"), tuple(sorted(labels)))] = float(m.group("value"))
    return out


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
