"""Plain-text answers, the same on every HTTP listener: EST, metrics and
health, publishing (CRL, OCSP), the reference approval service.

twisted.web answers what a resource does not handle with pages of HTML:
404 "No Such Resource", 405 "Method Not Allowed", 501 "Huh? I don't know
how to treat a FOO request" (a method it has no name for), 500
"Processing Failed"; and pages made with :mod:`twisted.web.pages` go out
chunked.  Here each such answer is one line of ``text/plain`` saying why,
with a Content-Length (devices and HTTP/1.0 clients that cannot read a
chunked reply), and:

* a method a resource does not take, known to HTTP or not, is 405 with
  ``Allow`` (RFC 9110 §15.5.6): the methods a resource takes are a fact
  about that resource, not about the server;
* a path that is not served is 404 (:class:`Branch`, :class:`NotFound`);
* a resource that raises is a logged 500 ``internal error``: a bug, never
  an answer to bad input.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.server import Request

from estgw.escape import printable

__all__ = ["TEXT", "Branch", "Leaf", "NotFound", "allow", "respond", "spoken", "text"]

#: The media type of every one-line answer.
TEXT = "text/plain; charset=utf-8"


def respond(
    request: Request,
    status: int,
    body: bytes,
    content_type: str | None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer ``request`` with ``status`` and ``body`` (none to HEAD),
    framed by a Content-Length, and finish it; nothing when the client has
    gone or it was answered already."""
    if request.finished or request._disconnected:
        return  # the client went away, or a limit answered: nothing can be written
    request.setResponseCode(status)
    if content_type is not None:
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("ascii"), value.encode("latin-1"))
    if status != 204:  # RFC 9110 §8.6: never on a 204, which has no body
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    if body and request.method != b"HEAD":
        request.write(body)
    request.finish()


def text(request: Request, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
    """Answer ``status`` with ``reason`` as one line of plain text (what a
    client chose in it escaped, :func:`estgw.escape.printable`)."""
    respond(request, status, (printable(reason) + "\n").encode("utf-8"), TEXT, headers)


def spoken(methods: Iterable[bytes]) -> str:
    """``GET``, ``GET or HEAD``, ``GET, HEAD or POST``."""
    names = [m.decode("ascii") for m in methods]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def allow(methods: Iterable[bytes]) -> dict[str, str]:
    """The Allow header (RFC 9110 §10.2.1) of a 405."""
    return {"Allow": ", ".join(m.decode("ascii") for m in methods)}


class NotFound(resource.Resource):
    """404 with ``reason``, whatever the method."""

    isLeaf = True

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def render(self, request: Request) -> Any:
        text(request, 404, self.reason)
        return server.NOT_DONE_YET


class Branch(resource.Resource):
    """An inner node of a tree (``/``, ``/.well-known``, ``/health``, the
    roots of the metrics, publishing and approval listeners): 404 saying
    ``reason`` for itself and for every child it does not have."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def getChild(self, path: bytes, request: Request) -> resource.Resource:
        return NotFound(self.reason)

    def render(self, request: Request) -> Any:
        return NotFound(self.reason).render(request)


class Leaf(resource.Resource):
    """A resource with nothing below it.

    The methods it takes are its ``render_<METHOD>`` methods, and HEAD
    wherever it takes GET (answered as GET, without the body).  Any other
    method is 405 with Allow and the one-line reason :attr:`takes` (by
    default "<:attr:`this`> takes GET or HEAD"); a path below it is 404
    :attr:`not_found`; a render method that raises is a logged 500.  A
    render method returns NOT_DONE_YET (having answered, e.g. with
    :func:`respond`, or to answer later) or the body bytes, which go out
    with a Content-Length.
    """

    isLeaf = True
    #: What the default 405 reason calls this resource.
    this = "this resource"
    #: The 405 reason; empty: "<this> takes <its methods>".
    takes = ""
    #: The 404 reason for a path below it.
    not_found = "no such resource"
    _log = Logger()

    def methods(self) -> tuple[bytes, ...]:
        """What it takes, in the order Allow lists them."""
        # Not twisted.web's own render_HEAD, which every Resource has.
        names = {
            name[len("render_"):].encode("ascii") for name in dir(self)
            if name.startswith("render_") and getattr(type(self), name) is not getattr(resource.Resource, name, None)
        }
        names.discard(b"HEAD")
        if b"GET" in names:
            names.add(b"HEAD")
        return tuple(sorted(names))

    def render(self, request: Request) -> Any:
        methods = self.methods()
        if request.method not in methods:
            text(request, 405, self.takes or f"{self.this} takes {spoken(methods)}", allow(methods))
            return server.NOT_DONE_YET
        if request.postpath:
            text(request, 404, self.not_found)
            return server.NOT_DONE_YET
        method = request.method.decode("ascii")
        handler = getattr(self, "render_" + ("GET" if method == "HEAD" else method))
        try:
            body = handler(request)
        except Exception:
            # A bug: bad input is answered by the render method itself.
            self._log.failure("while serving {method} {path}", method=method, path=printable(request.path))
            text(request, 500, "internal error")
            return server.NOT_DONE_YET
        if isinstance(body, bytes):
            respond(request, request.code, body, None)
            return server.NOT_DONE_YET
        return body
