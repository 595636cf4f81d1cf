"""Certificate signatures per second of the local CA for each ca.keyType
(and ca.rsaPadding for RSA), in this process, one core:

    .venv/bin/python bench/ca_sign_bench.py [--seconds N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from estgw.ca import IssueRequest, LocalCA, Profile
from estgw.ca.keys import KEY_TYPES
from estgw.testing import name, new_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per key type (default 1)")
    seconds = parser.parse_args().seconds
    request = IssueRequest(name("device"), new_key().public_key())
    print(f"{'ca.keyType':<10} {'padding':<9} {'certs/s':>8} {'ms each':>8}")
    for key_type in KEY_TYPES:
        for padding in ("pkcs1v15", "pss") if key_type.startswith("rsa-") else ("-",):
            with tempfile.TemporaryDirectory() as directory:
                ca = LocalCA.load_or_create(directory, key_type=key_type,
                                            rsa_padding=padding if padding != "-" else "pkcs1v15")
                count, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    ca.sign(request, Profile())
                    count += 1
                elapsed = time.perf_counter() - start
            print(f"{key_type:<10} {padding:<9} {count / elapsed:8.0f} {1000 * elapsed / count:8.2f}")


if __name__ == "__main__":
    main()
