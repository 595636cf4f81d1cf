"""EST over CoAPs (RFC 9148): DTLS on UDP, CoAP messages and block-wise
transfer, mapped onto the same handlers, filters, formats and store as
EST over HTTPS.

- :mod:`estgw.coaps.coap`: the CoAP message codec (RFC 7252 §3) and the
  Block1/Block2 options (RFC 7959);
- :mod:`estgw.coaps.dtls`: a DTLS 1.2 server on a Twisted UDP port, one
  pyOpenSSL memory-BIO connection per peer, cookie exchange first;
- :mod:`estgw.coaps.resource`: the EST resources, what a request's URI,
  method and Content-Format mean, and refusals as CoAP response codes.
"""
