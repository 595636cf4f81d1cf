"""Scan a running estgw TLS listener with sslyze; exit 1 on any insecure finding.

Run by .ci/tls-scan in its own virtualenv (sslyze pins its own
cryptography and nassl).  Usage: tls_scan.py HOST PORT
"""

from __future__ import annotations

import sys

from sslyze import (
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)

# Cipher suites nobody should accept today.
_WEAK = ("NULL", "anon", "EXPORT", "RC4", "_DES_", "3DES", "MD5")

COMMANDS = {
    ScanCommand.SSL_2_0_CIPHER_SUITES,
    ScanCommand.SSL_3_0_CIPHER_SUITES,
    ScanCommand.TLS_1_0_CIPHER_SUITES,
    ScanCommand.TLS_1_1_CIPHER_SUITES,
    ScanCommand.TLS_1_2_CIPHER_SUITES,
    ScanCommand.TLS_1_3_CIPHER_SUITES,
    ScanCommand.TLS_COMPRESSION,
    ScanCommand.SESSION_RENEGOTIATION,
    ScanCommand.HEARTBLEED,
    ScanCommand.OPENSSL_CCS_INJECTION,
    ScanCommand.ROBOT,
    ScanCommand.TLS_FALLBACK_SCSV,
}


def findings(result) -> list[str]:
    problems: list[str] = []
    attempts = result.scan_result
    for command in sorted(COMMANDS, key=lambda c: c.value):
        attempt = getattr(attempts, command.value)
        if attempt.status != ScanCommandAttemptStatusEnum.COMPLETED:
            problems.append(f"{command.value}: not completed ({attempt.error_reason})")
    if problems:
        return problems
    for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"):
        accepted = getattr(attempts, old).result.accepted_cipher_suites
        if accepted:
            problems.append(f"{old}: {len(accepted)} cipher suite(s) accepted; only TLS 1.2 and 1.3 may be")
    for current in ("tls_1_2_cipher_suites", "tls_1_3_cipher_suites"):
        for suite in getattr(attempts, current).result.accepted_cipher_suites:
            name = suite.cipher_suite.name
            if suite.cipher_suite.key_size < 128 or any(weak in name for weak in _WEAK):
                problems.append(f"{current}: weak cipher suite {name}")
    renegotiation = attempts.session_renegotiation.result
    if renegotiation.is_vulnerable_to_client_renegotiation_dos:
        problems.append("session_renegotiation: client-initiated renegotiation is accepted")
    if not renegotiation.supports_secure_renegotiation:
        problems.append("session_renegotiation: no secure renegotiation indication (RFC 5746)")
    if attempts.tls_compression.result.supports_compression:
        problems.append("tls_compression: TLS compression is on (CRIME)")
    if attempts.heartbleed.result.is_vulnerable_to_heartbleed:
        problems.append("heartbleed: vulnerable")
    if attempts.openssl_ccs_injection.result.is_vulnerable_to_ccs_injection:
        problems.append("openssl_ccs_injection: vulnerable")
    robot = attempts.robot.result.robot_result.name
    if robot.startswith("VULNERABLE"):
        problems.append(f"robot: {robot}")
    if not attempts.tls_fallback_scsv.result.supports_fallback_scsv:
        problems.append("tls_fallback_scsv: downgrade protection missing")
    return problems


def main(host: str, port: int) -> int:
    scanner = Scanner()
    scanner.queue_scans([
        ServerScanRequest(server_location=ServerNetworkLocation(hostname="localhost", port=port, ip_address=host),
                          scan_commands=COMMANDS)
    ])
    for result in scanner.get_results():
        if result.scan_status != ServerScanStatusEnum.COMPLETED:
            print(f"tls-scan: could not scan {host}:{port}: {result.connectivity_error_trace}")
            return 1
        problems = findings(result)
        accepted = [
            s.cipher_suite.name
            for attr in ("tls_1_2_cipher_suites", "tls_1_3_cipher_suites")
            for s in getattr(result.scan_result, attr).result.accepted_cipher_suites
        ]
        print(f"tls-scan: {host}:{port} accepts {len(accepted)} cipher suites: {', '.join(accepted)}")
        for problem in problems:
            print(f"tls-scan: INSECURE: {problem}")
        print(f"tls-scan: {len(problems)} insecure finding(s)")
        return 1 if problems else 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
