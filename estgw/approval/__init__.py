"""Manual approval of enrollments: the "IDM" web service.

* :mod:`estgw.approval.tls`: client credentials (PKCS#12 token, PEM
  files) and the TLS policy treq uses to present them;
* :mod:`estgw.approval.client`: the gateway's HTTPS + JSON client of an
  approval service (submit, status), with timeouts and backoff;
* :mod:`estgw.approval.gate`: the gateway's side of the flow, per handler:
  202 while pending, the certificate once approved (issued once), a
  refusal with the operator's reason once rejected;
* :mod:`estgw.approval.service`, :mod:`estgw.approval.tap`: the reference
  approval service, ``twistd estgw-approval``;
* :mod:`estgw.approval.cli`: ``estgw approval ...``, the operator's commands.

The contract between gateway and service is ``docs/approval-api.rst``.
"""
