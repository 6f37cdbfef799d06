"""De-identification: salted hashes for patient/study keys and stable sample keys.

The DICOM basic confidentiality profile is honoured by construction: ingest copies no header
element into its outputs; only the whitelisted covariates of `dicom.DecodedImage.header` and the
salted hashes below leave the decode step. The salt is a secret held in the environment.
"""
from __future__ import annotations

import hashlib
import hmac


def salted_hash(value: str, salt: str, kind: str, length: int = 16) -> str:
    """HMAC-SHA256 of `value` under `salt`, domain-separated by `kind` ("patient", "study", "key")."""
    mac = hmac.new(salt.encode("utf-8"), f"{kind}\x1f{value}".encode("utf-8"), hashlib.sha256)
    return mac.hexdigest()[:length]


def sample_key(relative_path: str, salt: str) -> str:
    """Stable, non-identifying sample key for an input, from its path relative to the input root."""
    return salted_hash(relative_path, salt, "key", 20)
