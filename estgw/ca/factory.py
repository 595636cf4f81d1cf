"""Build the token procedure that ``tokenprocedure.<n>.ca`` names.

A kind of token procedure is one module in this package with a function
``token_procedure(procedure, context)`` returning an
:class:`~estgw.ca.ITokenProcedure`, and one line in :data:`KINDS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import attr

from estgw.ca import CASettingError, ITokenProcedure, Profile

if TYPE_CHECKING:
    from estgw.ca.local import LocalCA
    from estgw.ca.threads import CAThreads
    from estgw.config import Config, TokenProcedureConfig

#: ``tokenprocedure.<n>.ca`` value -> module implementing it.
KINDS: dict[str, str] = {
    "local": "estgw.ca.local",
    "file": "estgw.ca.file",
    "pkcs11": "estgw.ca.pkcs11",
    "est": "estgw.ca.upstream",
}


@attr.s(frozen=True, auto_attribs=True)
class Context:
    """What the kinds share: the configuration, the embedded CA, the reactor."""

    config: "Config"
    local_ca: "LocalCA"
    reactor: Any = None


def profile_of(procedure: "TokenProcedureConfig") -> Profile:
    """What every kind puts into the certificates it issues for ``procedure``."""
    profile = Profile.from_settings(procedure.validity_days, procedure.key_usage, procedure.extended_key_usage)
    return attr.evolve(
        profile,
        crl_url=procedure.crl_url,
        ocsp_url=procedure.ocsp_url,
        ca_issuers_url=procedure.ca_issuers_url,
    )


def ca_threads(procedure: "TokenProcedureConfig", context: Context) -> "CAThreads":
    """The threads of ``procedure``'s blocking CA calls: ``ca.maxOverdue``
    of them, its own (see :mod:`estgw.ca.threads`)."""
    from estgw.ca.threads import CAThreads

    return CAThreads(context.reactor, procedure.name, context.config.ca_max_overdue)


def token_procedure(procedure: "TokenProcedureConfig", context: Context) -> ITokenProcedure:
    """The token procedure of ``procedure``; raises ConfigError naming the
    setting when one is wrong, CAError when the CA cannot be used otherwise."""
    from estgw.config import ConfigError

    module = importlib.import_module(KINDS[procedure.ca])
    try:
        built: ITokenProcedure = module.token_procedure(procedure, context)
    except CASettingError as e:
        raise ConfigError(f"tokenprocedure.{procedure.key}.{e.key}", str(e), context.config.source) from None
    return built


def token_procedures(context: Context) -> dict[str, ITokenProcedure]:
    """Every configured token procedure by name."""
    return {
        name: token_procedure(procedure, context)
        for name, procedure in context.config.token_procedures.items()
    }
