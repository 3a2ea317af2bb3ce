"""What an expert call says about itself in its metadata, so that a worker can refuse it before receiving its message.

gRPC Python receives a whole request message and copies it into one ``bytes`` object on the server's event loop
before any handler sees it: measured on a worker, 1.3-1.9 ms of CPU per MiB (fresh pages faulted in for each
copy), so a refused 32 MiB request cost 50-70 ms of the event loop that health checks wait on. Headers arrive
first: a worker refuses a call whose headers name another model, a layer it does not host or experts it does not
host, and never receives its message (``moevit.worker.service.header_screen``; docs/reliability.md).

A unary ``RunExperts`` call carries the model fingerprint, the layer and the expert ids; a ``RunExpertsStream``
call the fingerprint (its messages name their layers). The message still carries them too and is checked in full:
headers only let a call be refused early, never let one through. Clients that send no headers (older ones) are
served as before. Workers list :data:`FEATURE` in ``InfoResponse.features``; to other workers the headers are
unknown metadata, which gRPC ignores.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["EXPERTS", "FEATURE", "FINGERPRINT", "LAYER", "request_headers"]

FINGERPRINT = "moevit-fingerprint"
LAYER = "moevit-layer"
EXPERTS = "moevit-experts"  # comma-separated expert ids, in the order of the message
FEATURE = "request_headers"


def request_headers(fingerprint: str, layer: int | None = None,
                    experts: Iterable[int] | None = None) -> tuple[tuple[str, str], ...]:
    """The metadata of an expert call: the fingerprint, and for a unary call the layer and the experts."""
    headers = [(FINGERPRINT, fingerprint)]
    if layer is not None:
        headers.append((LAYER, str(int(layer))))
    if experts is not None:
        headers.append((EXPERTS, ",".join(str(int(e)) for e in experts)))
    return tuple(headers)
