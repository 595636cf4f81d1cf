"""estgw: an EST (RFC 7030 / RFC 8951) protocol gateway on Twisted."""

__version__ = "0.1.0"
