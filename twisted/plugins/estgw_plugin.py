"""twistd plugin: ``twistd estgw`` runs the EST gateway."""
from twisted.application.service import ServiceMaker

estgw = ServiceMaker(
    "estgw",
    "estgw.tap",
    "EST (RFC 7030) protocol gateway",
    "estgw",
)
