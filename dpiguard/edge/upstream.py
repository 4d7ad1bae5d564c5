"""Requests dpiguard itself makes to the DPI: reading a stored FHIR resource before a write.

The FHIR step (:mod:`dpiguard.decision.fhir`) checks update, patch and delete against the resource as
the DPI holds it; this reads it, with the user's identity headers, over a verified connection.
"""

from __future__ import annotations

import orjson

from dpiguard.decision.fhir import Fetcher


def make_fetcher(upstream_url: str, ca_file: str | None, timeout: float = 5.0) -> Fetcher:
    """GET a stored resource from the DPI with the user's identity headers (for update/patch/delete)."""
    import httpx

    client = httpx.Client(base_url=upstream_url.rstrip("/"), verify=ca_file or True, timeout=timeout,
                          follow_redirects=False)

    def fetch(path: str, _ident: str, headers: dict) -> dict | None:
        response = client.get(path, headers={**headers, "accept": "application/fhir+json"})
        if response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise RuntimeError(f"the DPI answered {response.status_code} to {path}")
        return orjson.loads(response.content)

    return fetch
