"""Where a long-running verifier (the key broker) gets DCAP collateral for each piece of evidence.

A verifier is given a *collateral source*: a fixed :class:`Collateral` (offline: a file or
directory, ``load_collateral``), or a callable ``source(evidence, now) -> Collateral | None``
that picks the collateral for the quote inside ``evidence``. :class:`PcsCollateralSource` is
such a callable over a PCS / PCCS (:class:`~enclaveml.attestation.pcs.PcsClient`): it asks
for the quote's FMSPC, TEE and PCK CA (``collateral_request``) and keeps each answer in
memory until its earliest ``nextUpdate`` (plus the client's optional on-disk cache), so a
busy broker asks the PCCS once per platform and collateral period, not once per release.

This is the adapter layer: it does network I/O through ``PcsClient``; verification itself
stays in ``evidence.verify_evidence``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from enclaveml.attestation.collateral import Collateral
from enclaveml.attestation.evidence import CollateralRequest, collateral_request

if TYPE_CHECKING:  # pcs brings httpx; whoever builds a PcsCollateralSource has imported it already
    from enclaveml.attestation.pcs import PcsClient

__all__ = ["CollateralSource", "PcsCollateralSource", "resolve_collateral"]

CollateralSource = Collateral | Callable[[bytes, datetime], Collateral | None] | None


def resolve_collateral(source: CollateralSource, evidence: bytes, now: datetime) -> Collateral | None:
    """The collateral ``source`` gives for ``evidence`` at ``now`` (None: none needed or none known)."""
    if source is None or isinstance(source, Collateral):
        return source
    return source(evidence, now)


class PcsCollateralSource:
    """Collateral per quote from a PCS / PCCS, cached in memory until it is due for update."""

    def __init__(self, client: PcsClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._cached: dict[CollateralRequest, tuple[datetime, Collateral]] = {}

    def __call__(self, evidence: bytes, now: datetime) -> Collateral | None:
        wanted = collateral_request(evidence)
        if wanted is None:
            return None  # simulated evidence: no collateral
        with self._lock:
            cached = self._cached.get(wanted)
            if cached is not None and now < cached[0]:
                return cached[1]
        from enclaveml.attestation.pcs import earliest_next_update

        fetched = self._client.fetch_collateral(wanted.fmspc, tee=wanted.tee, pck_ca=wanted.pck_ca, now=now)
        collateral = Collateral.from_dict(fetched)
        with self._lock:
            self._cached[wanted] = (earliest_next_update(fetched, source=self._client.base_url), collateral)
        return collateral

    def close(self) -> None:
        self._client.close()
