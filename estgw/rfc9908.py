"""The ASN.1 module of RFC 9908 (CSR attributes templates) in pyasn1.

pyasn1-modules has no RFC 9908 module; this one follows its ASN.1
(``DEFINITIONS IMPLICIT TAGS``) in the style of pyasn1-modules, so that
the template can be built and parsed with the same schema::

    CertificationRequestInfoTemplate ::= SEQUENCE {
        version       INTEGER { v1(0) } (v1, ... ),
        subject       NameTemplate OPTIONAL,
        subjectPKInfo [0] SubjectPublicKeyInfoTemplate OPTIONAL,
        attributes    [1] Attributes }

    NameTemplate ::= CHOICE { rdnSequence RDNSequenceTemplate }
    RDNSequenceTemplate ::= SEQUENCE OF RelativeDistinguishedNameTemplate
    RelativeDistinguishedNameTemplate ::=
        SET SIZE (1 .. MAX) OF SingleAttributeTemplate
    SingleAttributeTemplate ::= SEQUENCE {
        type   OBJECT IDENTIFIER,
        value  ANY OPTIONAL }

    SubjectPublicKeyInfoTemplate ::= SEQUENCE {
        algorithm         AlgorithmIdentifier,
        subjectPublicKey  BIT STRING OPTIONAL }

    ExtensionTemplate ::= SEQUENCE {
        extnID     OBJECT IDENTIFIER,
        critical   BOOLEAN DEFAULT FALSE,
        extnValue  OCTET STRING OPTIONAL }
    ExtensionReqTemplate ::= SEQUENCE SIZE (1..MAX) OF ExtensionTemplate

Attribute values are ANY, as in :mod:`pyasn1_modules.rfc5280`: callers
put whole DER encodings in them.
"""

from __future__ import annotations

from pyasn1.type import constraint, namedtype, namedval, tag, univ
from pyasn1_modules import rfc5280

MAX = float("inf")

id_aa = univ.ObjectIdentifier("1.2.840.113549.1.9.16.2")
#: The CsrAttrs attribute that carries a CertificationRequestInfoTemplate.
id_aa_certificationRequestInfoTemplate = id_aa + (61,)
#: Inside a template: extensions some of whose values the client chooses.
id_aa_extensionReqTemplate = id_aa + (62,)
#: PKCS#9 extensionRequest: exactly one Extensions value (RFC 9908 §3.2).
id_ExtensionReq = univ.ObjectIdentifier("1.2.840.113549.1.9.14")


class SingleAttributeTemplate(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("type", univ.ObjectIdentifier()),
        namedtype.OptionalNamedType("value", univ.Any()),
    )


class RelativeDistinguishedNameTemplate(univ.SetOf):
    componentType = SingleAttributeTemplate()
    subtypeSpec = constraint.ValueSizeConstraint(1, MAX)


class RDNSequenceTemplate(univ.SequenceOf):
    componentType = RelativeDistinguishedNameTemplate()


class NameTemplate(univ.Choice):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("rdnSequence", RDNSequenceTemplate()),
    )


class SubjectPublicKeyInfoTemplate(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("algorithm", rfc5280.AlgorithmIdentifier()),
        namedtype.OptionalNamedType("subjectPublicKey", univ.BitString()),
    )


class ExtensionTemplate(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("extnID", univ.ObjectIdentifier()),
        namedtype.DefaultedNamedType("critical", univ.Boolean(False)),
        namedtype.OptionalNamedType("extnValue", univ.OctetString()),
    )


class ExtensionReqTemplate(univ.SequenceOf):
    componentType = ExtensionTemplate()
    subtypeSpec = constraint.ValueSizeConstraint(1, MAX)


class Attributes(univ.SetOf):
    componentType = rfc5280.Attribute()


class CertificationRequestInfoTemplate(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("version", univ.Integer(namedValues=namedval.NamedValues(("v1", 0)))),
        namedtype.OptionalNamedType("subject", NameTemplate()),
        namedtype.OptionalNamedType(
            "subjectPKInfo",
            SubjectPublicKeyInfoTemplate().subtype(
                implicitTag=tag.Tag(tag.tagClassContext, tag.tagFormatConstructed, 0)
            ),
        ),
        namedtype.NamedType(
            "attributes",
            Attributes().subtype(implicitTag=tag.Tag(tag.tagClassContext, tag.tagFormatConstructed, 1)),
        ),
    )
