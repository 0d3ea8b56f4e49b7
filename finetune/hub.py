"""The Hugging Face hub as finetune meets it: the cache folder in use, the endpoint, whether the
user asked to stay offline, and whether the endpoint can be reached at all, probed in seconds
before any download is tried (a download through a dead network waits for minutes).

Used by the model sources (:mod:`finetune.models.sources`) and the dataset source
(:mod:`finetune.data.hf`); imports nothing of finetune.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
"""Seconds to wait for a TCP connection to the hub (or its proxy) before calling it unreachable."""


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The hub cache folder in use (``HF_HUB_CACHE``, usually ``~/.cache/huggingface/hub``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT``, else the client's default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_offline_forced() -> bool:
    """True when the user told the hub client to stay offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in ("1", "on", "yes", "true") or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def endpoint_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection be opened to ``url``'s host (or its proxy) within ``timeout``?"""
    from urllib.request import getproxies, proxy_bypass

    parsed = urlparse(url)
    proxies = getproxies()  # HTTPS_PROXY, HTTP_PROXY, ALL_PROXY..., as the HTTP clients read them
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and parsed.hostname and proxy_bypass(parsed.hostname):  # NO_PROXY
        proxy = None
    target = urlparse(proxy if proxy else url)
    host = target.hostname
    port = target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
