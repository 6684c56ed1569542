"""Fail fast, with a hint, when a Hub model cannot be fetched.

Without a network, ``from_pretrained("namespace/name")`` retries for about a minute and then raises a bare
``OSError``. The command line and the examples call :func:`check_hub_model_reachable` once before loading a
Hub id: one TCP connection to the Hub endpoint (or to the HTTPS proxy), a few seconds at most, and a message
that says what to do (connect, set ``HF_HUB_OFFLINE=1`` for a cached model, or pass a local folder).
"""

from __future__ import annotations

import socket
import urllib.request
from urllib.parse import urlsplit

#: Seconds to wait for the TCP connection to the endpoint (or proxy).
DEFAULT_TIMEOUT = 5.0


class HubUnreachableError(OSError):
    """The model is a Hub id, it is not usable from the local cache, and the Hub cannot be reached."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _connect_target(url: str) -> tuple[str, int]:
    """The host and port a request to ``url`` opens first: the proxy's, when one applies, else the URL's."""
    parts = urlsplit(url)
    scheme = parts.scheme or "https"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or 80
    return parts.hostname or "", parts.port or (443 if scheme == "https" else 80)


def unreachable_reason(url: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """``None`` when a TCP connection towards ``url`` (default: the Hub endpoint) opens within ``timeout``
    seconds; otherwise why it did not (name resolution, refusal, timeout)."""
    url = url or _endpoint()
    host, port = _connect_target(url)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"
    return None


def _is_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def check_hub_model_reachable(
    repo_id: str, revision: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Raise :class:`HubUnreachableError` (with what to do) when ``repo_id`` can neither be downloaded now
    nor loaded in offline mode; return quietly otherwise. Costs one TCP connection attempt."""
    from huggingface_hub import constants

    cached = _is_cached(repo_id, revision)
    if constants.is_offline_mode():
        if cached:
            return
        raise HubUnreachableError(
            f"HF_HUB_OFFLINE is set and {repo_id!r} is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): unset HF_HUB_OFFLINE to download it, or pass a local model folder"
        )
    endpoint = _endpoint()
    reason = unreachable_reason(endpoint, timeout)
    if reason is None:
        return
    hint = (
        "the model is in the local cache: set HF_HUB_OFFLINE=1 to load it from there"
        if cached
        else "check the network connection (or HTTPS_PROXY / HF_ENDPOINT), or pass a local model folder"
    )
    raise HubUnreachableError(f"cannot reach {endpoint} to load {repo_id!r} ({reason}); {hint}")
