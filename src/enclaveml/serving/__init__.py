"""The model server: encrypted models, TF Serving gRPC and KServe v2 REST APIs, TLS / mTLS / RA-TLS."""

from __future__ import annotations

__all__: list[str] = []
