"""Client-chosen text is printed and logged as one line of printable
text: estgw.escape.printable, and the log lines and CLI output that use
it, with control characters, newlines and ANSI escapes injected."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw import cli
from estgw.approval import cli as approval_cli
from estgw.escape import printable
from estgw.passwords import hash_password
from estgw.store import Device, IssuedCertificate
from tests.test_auth import FACTORY_CA, SecurityTestCase, csr_for, gateway_certificate, run_cli

# Clears the screen, then starts a line that looks like one of ours.
FORGED = "x\x1b[2J\nFORGED issued serial 1 subject CN=admin"
# Characters str.splitlines() also breaks on, and a right-to-left override.
SEPARATORS = "a\rb\x0bc\x1cd\x85e\u2028f\u2029g\u202eh"


def assert_one_clean_line(testcase: Any, text: str) -> None:
    """``text`` is one line with no control or separator character."""
    testcase.assertEqual(len(text.rstrip("\n").splitlines()), 1, repr(text))
    testcase.assertTrue(text.rstrip("\n").isprintable(), repr(text))


class PrintableTests(SynchronousTestCase):
    def test_examples(self) -> None:
        """Escapes as Python writes them; printable text, backslashes and
        RFC 4514 escapes unchanged."""
        self.assertEqual(printable(FORGED), "x\\x1b[2J\\nFORGED issued serial 1 subject CN=admin")
        self.assertEqual(printable(SEPARATORS), "a\\rb\\x0bc\\x1cd\\x85e\\u2028f\\u2029g\\u202eh")
        self.assertEqual(printable("t\tab\x00\x7f\u00a0"), "t\\tab\\x00\\x7f\\xa0")
        self.assertEqual(printable("\U000e0041\ud800"), "\\U000e0041\\ud800")
        self.assertEqual(printable(b"caf\xc3\xa9 \xff"), "café \\xff")
        for text in ("CN=a\\,b+O=c\\0A", "Grüße 東京", "C:\\path", ""):
            self.assertEqual(printable(text), text)
        self.assertEqual(printable(17), "17")

    @settings(max_examples=300, deadline=None)
    @given(st.text())
    def test_any_text(self, text: str) -> None:
        """Any text: one printable line; printable text is left alone;
        escaping again changes nothing."""
        shown = printable(text)
        self.assertTrue(shown.isprintable())
        self.assertLessEqual(len(shown.splitlines()), 1)
        self.assertEqual(printable(shown), shown)
        if text.isprintable():
            self.assertEqual(shown, text)

    @settings(max_examples=200, deadline=None)
    @given(st.binary())
    def test_any_bytes(self, data: bytes) -> None:
        """Any bytes: one printable line."""
        self.assertTrue(printable(data).isprintable())


class LogAndCLITests(SecurityTestCase):
    """A real gateway; hostile names in certificates, CSRs and device ids."""

    async def setUp(self) -> None:
        await self.setUpGateway()
        self.logged: list[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def assert_log_clean(self) -> list[str]:
        """Every event logged so far formats as one clean line; the lines."""
        lines = [formatEvent(e) for e in self.logged]
        for line in lines:
            assert_one_clean_line(self, line)
        return lines

    async def test_officer_name_in_issued_line_and_cert_list(self) -> None:
        """An officer certificate whose subject forges a line: `officer add`
        and `officer list` print it escaped; the enrollment it makes is
        logged as one line, and `cert list` / `cert show` keep the requester
        on one row."""
        officer = gateway_certificate(self.gateway, self.directory, FORGED)
        out = await run_cli(self.gateway, "officer", "add", "--cert", officer.cert_path, "--role", "ra")
        assert_one_clean_line(self, out)
        self.assertIn("x\\x1b[2J\\nFORGED", out)
        listing = (await run_cli(self.gateway, "officer", "list")).splitlines()
        self.assertEqual(len(listing), 2)
        self.assertIn("x\\x1b[2J\\nFORGED", listing[1])
        result = await self.gateway.curl("ra/simpleenroll", data=csr_for("pump-17"), **officer.curl)
        self.assertEqual(result.status, 200, result.text)
        (issued,) = [line for line in self.assert_log_clean() if line.startswith("issued serial")]
        self.assertIn("to officer:CN=x\\x1b[2J\\nFORGED issued serial 1 subject CN=admin#serial=", issued)
        rows = (await run_cli(self.gateway, "cert", "list")).splitlines()
        self.assertEqual(len(rows), 2)
        self.assertIn("officer:CN=x\\x1b[2J\\nFORGED", rows[1])
        serial = rows[1].split()[0]
        shown = (await run_cli(self.gateway, "cert", "show", serial)).split("-----BEGIN")[0]
        requester = [line for line in shown.splitlines() if line.startswith("requester:")]
        self.assertEqual(len(requester), 1)
        self.assertIn("x\\x1b[2J\\nFORGED", requester[0])
        for line in shown.splitlines():
            self.assertTrue(line.isprintable(), repr(line))

    async def test_certificate_subject_in_cert_list_and_show(self) -> None:
        """A recorded certificate whose subject and SANs carry control and
        separator characters: one row in `cert list`, one line per field
        in `cert show`, and `cert revoke` says it in one line."""
        from cryptography import x509
        from estgw.ca import IssueRequest, Profile
        from estgw.testing import name, new_key

        cert = self.gateway.service.state.ca.sign(
            IssueRequest(
                subject=name("pump-17", organization_name=FORGED, organizational_unit_name=SEPARATORS),
                public_key=new_key().public_key(),
                sans=(x509.DNSName("a\nb.example"), x509.UniformResourceIdentifier("urn:\x1b[31mred")),
            ),
            Profile(),
        )
        await self.gateway.store.record_certificate(IssuedCertificate.from_certificate(cert, "2", "device:" + FORGED))
        rows = (await run_cli(self.gateway, "cert", "list")).splitlines()
        self.assertEqual(len(rows), 2)
        self.assertTrue(rows[1].isprintable(), repr(rows[1]))
        self.assertIn("\\u2028", rows[1])
        shown = (await run_cli(self.gateway, "cert", "show", f"{cert.serial_number:x}")).split("-----BEGIN")[0]
        lines = shown.splitlines()
        self.assertEqual([line.split(":")[0] for line in lines][:3], ["serial", "subject", "subjectAltName"])
        for line in lines:
            self.assertTrue(line.isprintable(), repr(line))
        self.assertIn("a\\nb.example", lines[2])
        self.assertIn("\\x1b[31mred", lines[2])
        revoked = await run_cli(self.gateway, "cert", "revoke", f"{cert.serial_number:x}")
        assert_one_clean_line(self, revoked)

    async def test_device_id_in_device_list(self) -> None:
        """A device id with an escape and a newline (e.g. from a CSV import): one row."""
        await self.gateway.store.add_device(Device(FORGED, hash_password("pw")))
        rows = (await run_cli(self.gateway, "device", "list")).splitlines()
        self.assertEqual(len(rows), 2)
        self.assertTrue(rows[1].startswith("x\\x1b[2J\\nFORGED"), rows[1])
        removed = await run_cli(self.gateway, "device", "remove", FORGED)
        assert_one_clean_line(self, removed)

    async def test_refusal_lines(self) -> None:
        """Refusals that quote the client: a foreign client certificate
        with a forging subject (in the audit line's client field) and a
        Digest user name that forges lines.  Each response body and each
        log line is one clean line; nothing is issued."""
        foreign = FACTORY_CA.issue(self.directory, FORGED)
        results = [
            await self.gateway.curl("simpleenroll", data=csr_for("pump-17"), **foreign.curl),
            await self.gateway.curl(
                "digest/simpleenroll", data=csr_for("pump-17"),
                headers=['Authorization: Digest username="\x1b[2J", realm="digest realm"'],
            ),
        ]
        for result in results:
            self.assertGreaterEqual(result.status, 400, result.text)
            assert_one_clean_line(self, result.text)
        lines = self.assert_log_clean()
        (client,) = [line for line in lines if "issuer-not-accepted" in line]
        self.assertIn("(CN=x\\x1b[2J\\nFORGED issued serial 1 subject CN=admin)", client)
        self.assertEqual(await self.gateway.store.count_certificates(), 0)

    async def test_csr_subject_logged(self) -> None:
        """A CSR subject that forges a line, from a password device: issued
        or refused, every log line it causes is one clean line."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        result = await self.gateway.curl(
            "simpleenroll", data=csr_for("pump-17", organization_name=FORGED), user="pump-17:s3cret"
        )
        if result.status != 200:
            assert_one_clean_line(self, result.text)
        lines = self.assert_log_clean()
        self.assertTrue(any("x\\x1b[2J\\nFORGED" in line for line in lines), lines)


class _Service:
    """The approval service as `estgw approval list/approve/reject` sees it."""

    def __init__(self, reactor: Any, options: Any) -> None:
        pass

    async def call(self, method: str, path: str = "", body: Any = None, params: Any = None) -> Any:
        request = {
            "requestId": "0f6b\x1b[2J", "status": "pending", "createdAt": "2026-11-30T06:00:00Z",
            "subject": "CN=pump-17,O=" + FORGED, "requester": "device:" + SEPARATORS, "reason": FORGED,
            "issuedSubject": "CN=pump-17,O=" + FORGED, "subjectAltNames": ["DNS:a\nb", "URI:\x1b[31m"],
            "publicKey": "EC\u2028P-256",
        }
        return {"requests": [request, request]} if method == "GET" else request


class ApprovalCLITests(TestCase):
    """What the approval service returns came from devices: escaped."""

    async def test_list_approve_reject(self) -> None:
        """`approval list` has one row per request and one line of what it
        would issue; approve and reject one line each."""
        self.patch(approval_cli, "_ServiceClient", _Service)
        options = ["approval", "--url", "https://127.0.0.1:1/approval/requests"]
        for argv, lines in (
            (["list"], 5), (["approve", "0f6b"], 1), (["reject", "0f6b", "--reason", "no"], 1)
        ):
            out = io.StringIO()
            await cli.run(reactor, options + argv, out)
            rows = out.getvalue().splitlines()
            self.assertEqual(len(rows), lines, out.getvalue())
            for row in rows:
                self.assertTrue(row.isprintable(), repr(row))
            self.assertIn("x\\x1b[2J\\nFORGED", out.getvalue())
