"""API keys: which key a client sends, and the ``authorization`` metadata
that carries it. The token itself is never put in an error message."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

API_KEY_ENV = "ONCELY_API_KEY"
"""The environment variable :class:`~oncely.Client` takes its API key from
when none is passed."""

AUTHORIZATION_HEADER = "authorization"
"""The request metadata that carries the key, as ``Bearer <token>``."""

API_KEY_INVALID = "API_KEY_INVALID"
"""The ``ErrorInfo`` reason of ``UNAUTHENTICATED``: no key, or one the
server does not know or that was revoked."""

PERMISSION_DENIED = "PERMISSION_DENIED"
"""The ``ErrorInfo`` reason of ``PERMISSION_DENIED``: the key's role or
scope does not allow the call."""

# What a token may hold to be sent as metadata: visible ASCII.
_VALID_TOKEN = re.compile(r"[\x21-\x7e]+")


def resolve_api_key(api_key: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The token a client sends, or None for no key.

    ``api_key`` None means the environment's ``ONCELY_API_KEY`` (unset or
    blank: no key); an empty string means no key, whatever the environment
    says. Surrounding whitespace is dropped. Raises ValueError, without the
    token in the message, unless what is left is visible ASCII (a token
    alone, without ``Bearer``)."""
    source = "api_key"
    if api_key is None:
        api_key = (os.environ if environ is None else environ).get(API_KEY_ENV, "")
        source = API_KEY_ENV
    if not isinstance(api_key, str):
        raise TypeError(f"api_key must be a string or None, not {type(api_key).__name__}")
    token = api_key.strip()
    if not token:
        return None
    if not _VALID_TOKEN.fullmatch(token):
        raise ValueError(
            f"{source} must be the API token alone (visible ASCII, without 'Bearer '), as `oncely keys create` prints it"
        )
    return token


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The request metadata that sends ``token``; empty for no key."""
    return () if token is None else ((AUTHORIZATION_HEADER, f"Bearer {token}"),)
