"""twistd plugin: ``twistd estgw-approval`` runs the reference approval service."""
from twisted.application.service import ServiceMaker

estgw_approval = ServiceMaker(
    "estgw-approval",
    "estgw.approval.tap",
    "Reference approval (IDM) service for estgw manual approval",
    "estgw-approval",
)
