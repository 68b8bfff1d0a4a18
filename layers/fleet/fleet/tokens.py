"""Customer tokens: ``flt_<30 base62 chars>_<6 base62 checksum chars>``.

The prefix lets secret scanners find a leaked token; the checksum (CRC-32 of the
random part, as GitHub's tokens do) lets the server refuse a mistyped or forged
token before touching the database. Only the SHA-256 of a token is ever stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib

PREFIX = "flt_"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_LEN = 30  # 30 base62 characters: about 178 bits of entropy
_CHECK_LEN = 6
_TOKEN_RE = re.compile(rf"^{PREFIX}([0-9A-Za-z]{{{_RANDOM_LEN}}})_([0-9A-Za-z]{{{_CHECK_LEN}}})$")


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def _checksum(random_part: str) -> str:
    return _base62(zlib.crc32(random_part.encode()), _CHECK_LEN)


def generate() -> str:
    random_part = "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LEN))
    return f"{PREFIX}{random_part}_{_checksum(random_part)}"


def well_formed(token: str | None) -> bool:
    """Prefix, length, alphabet and checksum are right (no database involved)."""
    if not token or len(token) > 64:
        return False
    match = _TOKEN_RE.match(token)
    return bool(match) and secrets.compare_digest(_checksum(match[1]), match[2])  # type: ignore[index]


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def hint(token: str) -> str:
    """What may be shown of a token to tell it apart: the prefix and last 4 characters."""
    return f"{PREFIX}…{token[-4:]}"
