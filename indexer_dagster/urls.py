"""Redacting URLs before they are shown, and telling a PostgreSQL URL from a file path.

RPC URLs often carry API keys in their path or query, so only the scheme and host are shown
(`redact_to_host`); database URLs keep everything but the password (`redact_password`)."""

import re
from urllib.parse import urlsplit, urlunsplit


def redact_to_host(url: str) -> str:
    """Scheme and host only: RPC paths and query strings often carry API keys."""
    m = re.match(r"^(https?://)([^/@]*@)?([^/?#]+)", url)
    return f"{m.group(1)}{m.group(3)}/…" if m else "<rpc url>"


def redact_password(url: str) -> str:
    """The URL with any password replaced by `***` (in the user-info part and in a `password=` parameter)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{host}"
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except Exception:  # noqa: BLE001 - never let redaction leak the input
        return "<unparseable url>"


def is_postgres_url(s: str) -> bool:
    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    return scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+")


def libpq_url(url: str) -> str:
    """`postgresql+psycopg2://...` (SQLAlchemy style) -> `postgresql://...` for libpq."""
    scheme, rest = url.split("://", 1)
    if scheme.lower().startswith("postgresql+"):
        scheme = "postgresql"
    return f"{scheme}://{rest}"
