"""Alerts: one JSON POST to the configured webhook, retried with backoff, always logged, never raised.

The payload is `{kind, severity, chain, summary, text, details, time}` (`text` makes it a valid Slack /
Mattermost incoming-webhook message as it is). Every string in it is scrubbed of the config's secrets,
and the webhook URL (which may carry a token) is only ever logged redacted. The decisions — is this
reorg deep, is the index stale, does the RPC keep failing — are plain functions here, so the Dagster
sensors only call them and keep their "already alerted" state in their cursors.
"""

import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from indexer_dagster.config import AlertsConfig, IndexerConfig
from indexer_dagster.health.logs import get_logger, register_url, scrub
from indexer_dagster.health.rpc_stats import failures
from indexer_dagster.urls import redact_to_host

log = get_logger(__name__)

RUN_FAILURE = "run_failure"
CHECK_FAILED = "asset_check_failed"
DEEP_REORG = "deep_reorg"
RPC_FAILING = "rpc_failing"
RPC_RECOVERED = "rpc_recovered"
FRESHNESS = "freshness"
FRESHNESS_RECOVERED = "freshness_recovered"
CHAIN_HALTED = "chain_halted"
MAX_TEXT = 2000
RPC_MIN_ERRORS = 10     # errors since the last check before the error share counts
RPC_ERROR_SHARE = 0.5


@dataclass
class Alert:
    kind: str
    summary: str
    chain: str | None = None
    severity: str = "error"  # error | warning | info
    details: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def payload(self) -> dict[str, Any]:
        return _scrub_tree({
            "kind": self.kind,
            "severity": self.severity,
            "chain": self.chain,
            "summary": self.summary,
            "text": f"[indexer{'/' + self.chain if self.chain else ''}] {self.severity.upper()} {self.summary}",
            "details": self.details,
            "time": datetime.fromtimestamp(self.at, UTC).isoformat(),
        })


def _scrub_tree(v: Any) -> Any:
    if isinstance(v, str):
        return scrub(v)[:MAX_TEXT]
    if isinstance(v, dict):
        return {str(k): _scrub_tree(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_scrub_tree(x) for x in v]
    return v


def send_alert(
    alerts: AlertsConfig | None, alert: Alert, *, sleep: Callable[[float], None] = time.sleep,
    base_delay_s: float = 0.5, max_delay_s: float = 8.0,
) -> bool:
    """Log the alert and POST it to the webhook (if one is configured); True when delivered.

    Retries timeouts, connection errors, 408, 429 and 5xx with exponential backoff and jitter; other
    4xx fail at once. Never raises.
    """
    try:
        level = {"error": logging.ERROR, "warning": logging.WARNING}.get(alert.severity, logging.INFO)
        log.log(level, "alert %s%s: %s", alert.kind, f" ({alert.chain})" if alert.chain else "", scrub(alert.summary))
        url = alerts.webhook_url if alerts else None
        if alerts is None or not url:
            return False
        register_url(url)
        body = json.dumps(alert.payload(), default=str).encode()
        attempts = alerts.max_attempts
        why = ""
        for attempt in range(attempts):
            retriable = True
            try:
                req = urllib.request.Request(url, data=body, method="POST", headers={
                    "Content-Type": "application/json", "User-Agent": "indexer_dagster-alerts"})
                with urllib.request.urlopen(req, timeout=alerts.timeout_s) as resp:
                    resp.read()
                return True
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}"
                retriable = e.code in (408, 425, 429) or e.code >= 500
            except Exception as e:  # noqa: BLE001 - timeouts, refused connections, DNS, TLS
                reason = getattr(e, "reason", None)
                why = type(reason).__name__ if isinstance(reason, BaseException) else type(e).__name__
            if not retriable or attempt == attempts - 1:
                break
            sleep(random.uniform(0.5, 1.0) * min(max_delay_s, base_delay_s * 2 ** attempt))
        log.error("alert %s not delivered to the webhook %s after %d attempt(s): %s",
                  alert.kind, redact_to_host(url), attempt + 1, why)
        return False
    except Exception as e:  # noqa: BLE001 - alerting must never break its caller
        log.error("alert %s could not be sent: %s", alert.kind, scrub(f"{type(e).__name__}: {e}"))
        return False


# --- decisions ----------------------------------------------------------------------------------------------

def deep_reorg_alert(cfg: IndexerConfig, reorg) -> Alert | None:
    """An alert for a ledger entry (`state.Reorg`) deeper than `confirmations`, else None."""
    if reorg.depth <= cfg.chain.confirmations:
        return None
    return Alert(
        DEEP_REORG,
        f"reorg {reorg.id} replaced {reorg.depth} blocks above block {reorg.common_ancestor} "
        f"(deeper than confirmations={cfg.chain.confirmations})"
        + ("; rows that were `confirmed` were rolled back" if reorg.touched_confirmed else ""),
        chain=cfg.chain.name,
        details={
            "reorg_id": reorg.id, "fork_block": reorg.common_ancestor, "depth": reorg.depth,
            "old_head": reorg.old_head, "old_head_hash": reorg.old_head_hash,
            "new_head": reorg.new_head, "new_head_hash": reorg.new_head_hash,
            "phase": getattr(reorg.phase, "value", str(reorg.phase)), "touched_confirmed": reorg.touched_confirmed,
            "affected_partitions": list(reorg.affected_partitions), "confirmations": cfg.chain.confirmations,
        },
    )


def halted_alert(chain: str, reason: str, reorg_id: int | None = None) -> Alert:
    """A chain halted for an operator: nothing of it is written until `indexer resume`."""
    return Alert(
        CHAIN_HALTED,
        f"chain halted: {reason}; nothing is written until `indexer resume --chain {chain}`",
        chain=chain,
        details={"reason": reason, "reorg_id": reorg_id, "resume": f"indexer resume --chain {chain}"},
    )


def freshness_breach(alerts: AlertsConfig, status) -> str | None:
    """Why the index is stale (`health.status.ChainStatus` against the thresholds), or None."""
    if status.lag_blocks is not None and status.lag_blocks > alerts.max_lag_blocks:
        return f"the indexed head is {status.lag_blocks} blocks behind the node (limit {alerts.max_lag_blocks})"
    if status.lag_seconds is not None and status.lag_seconds > alerts.max_lag_seconds:
        return (f"the indexed head is {status.lag_seconds:.0f} s behind the node's head block "
                f"(limit {alerts.max_lag_seconds:.0f} s)")
    return None


def _status_details(status) -> dict[str, Any]:
    return {
        "node_head": status.node_head, "indexed_head": status.indexed_head, "lag_blocks": status.lag_blocks,
        "lag_seconds": status.lag_seconds, "missing_partitions": len(status.missing_partitions),
        "rpc_error_rate": status.rpc_error_rate,
    }


@dataclass
class WatchState:
    """What a watcher already alerted about (kept in the freshness sensor's cursor)."""

    stale: bool = False
    rpc_failures: int = 0
    rpc_alerted: bool = False
    seen_requests: int | None = None  # the durable RPC totals at the last check (None: not yet seen)
    seen_errors: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "WatchState":
        try:
            data = json.loads(text) if text else {}
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError):
            return cls()


def _request_errors(status, state: WatchState) -> tuple[int, int, int, int]:
    """(requests, errors) now and since the last check, from the durable RPC counters."""
    requests, errors = sum(status.rpc_requests.values()), failures(status.rpc_errors)
    if state.seen_requests is None or requests < state.seen_requests:  # first look, or counters were reset
        return requests, errors, 0, 0
    return requests, errors, requests - state.seen_requests, errors - state.seen_errors


def watch(cfg: IndexerConfig, status, state: WatchState) -> tuple[WatchState, list[Alert]]:
    """Compare a fresh status with what was already alerted: alert once per breach, and once more when
    it clears. The RPC counts as failing when the node does not answer the check, or when most of the
    indexer's own requests since the last check failed (at least `RPC_MIN_ERRORS`); after
    `alerts.rpc_failures` such checks in a row it alerts. An unreachable node is not also called stale."""
    alerts_cfg, chain = cfg.alerts, cfg.chain.name
    new = WatchState(**state.__dict__)
    out: list[Alert] = []
    requests, errors, d_req, d_err = _request_errors(status, state)
    new.seen_requests, new.seen_errors = requests, errors
    erroring = d_err >= RPC_MIN_ERRORS and d_err >= RPC_ERROR_SHARE * d_req
    if not status.node_reachable or erroring:
        new.rpc_failures += 1
        why: str | None = (f"the node did not answer: {status.node_error}" if not status.node_reachable
               else f"{d_err} of the indexer's last {d_req} RPC requests failed")
        if new.rpc_failures >= alerts_cfg.rpc_failures and not new.rpc_alerted:
            new.rpc_alerted = True
            out.append(Alert(RPC_FAILING, f"the RPC keeps failing ({new.rpc_failures} checks in a row); {why}",
                             chain=chain,
                             details={"consecutive_failures": new.rpc_failures, "node_error": status.node_error,
                                      "recent_requests": d_req, "recent_errors": d_err,
                                      "rpc_error_rate": status.rpc_error_rate}))
        if not status.node_reachable:
            return new, out
    else:
        if new.rpc_alerted:
            out.append(Alert(RPC_RECOVERED, "the RPC answers again", chain=chain, severity="info"))
        new.rpc_failures, new.rpc_alerted = 0, False
    why = freshness_breach(alerts_cfg, status)
    if why and not new.stale:
        new.stale = True
        out.append(Alert(FRESHNESS, why, chain=chain, severity="warning", details=_status_details(status)))
    elif not why and new.stale:
        new.stale = False
        out.append(Alert(FRESHNESS_RECOVERED, f"the index caught up: {status.lag_blocks} blocks behind",
                         chain=chain, severity="info", details=_status_details(status)))
    return new, out


def run_failure_alert(chain: str | None, run_id: str, job: str, message: str, tags: dict[str, str],
                      errors: list[str]) -> Alert:
    partition = tags.get("dagster/partition") or "..".join(
        t for t in (tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")) if t
    ) or None
    first = errors[0] if errors else message
    return Alert(
        RUN_FAILURE,
        f"run {run_id[:8]} of {job}{f' ({partition})' if partition else ''} failed: {first}",
        chain=chain,
        details={"run_id": run_id, "job": job, "partition": partition, "message": message, "errors": errors[:5]},
    )


def check_failed_alert(chain: str | None, check: str, asset: str, run_id: str, partition: str | None,
                       severity: str, description: str | None, metadata: dict[str, Any]) -> Alert:
    return Alert(
        CHECK_FAILED,
        f"asset check {check} on {asset}{f' [{partition}]' if partition else ''} failed"
        + (f": {description}" if description else ""),
        chain=chain,
        severity="error" if severity.upper() == "ERROR" else "warning",
        details={"check": check, "asset": asset, "run_id": run_id, "partition": partition,
                 "check_severity": severity, "description": description, "metadata": metadata},
    )
