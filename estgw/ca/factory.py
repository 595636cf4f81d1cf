"""Build the token procedure that ``tokenprocedure.<n>.ca`` names.

A kind of token procedure is one module in this package with a function
``token_procedure(procedure, context)`` returning an
:class:`~estgw.ca.ITokenProcedure`, and one line in :data:`KINDS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import attr

from estgw.ca import ITokenProcedure

if TYPE_CHECKING:
    from estgw.ca.local import LocalCA
    from estgw.config import Config, TokenProcedureConfig

#: ``tokenprocedure.<n>.ca`` value -> module implementing it.
KINDS: dict[str, str] = {
    "local": "estgw.ca.local",
    "pkcs11": "estgw.ca.pkcs11",
    "est": "estgw.ca.upstream",
}


@attr.s(frozen=True, auto_attribs=True)
class Context:
    """What the kinds share: the configuration, the embedded CA, the reactor."""

    config: "Config"
    local_ca: "LocalCA"
    reactor: Any = None


def token_procedure(procedure: "TokenProcedureConfig", context: Context) -> ITokenProcedure:
    """The token procedure of ``procedure``; raises CAError when it cannot be made."""
    module = importlib.import_module(KINDS[procedure.ca])
    built: ITokenProcedure = module.token_procedure(procedure, context)
    return built


def token_procedures(context: Context) -> dict[str, ITokenProcedure]:
    """Every configured token procedure by name."""
    return {
        name: token_procedure(procedure, context)
        for name, procedure in context.config.token_procedures.items()
    }
