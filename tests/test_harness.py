"""The test harness itself: a gateway on 127.0.0.1 answered by real curl."""

from twisted.trial.unittest import TestCase

from estgw.protocol import decode_certs_only
from estgw.testing import RunningGateway


class RunningGatewayTests(TestCase):
    async def test_cacerts_through_curl(self) -> None:
        """A started gateway answers cacerts over TLS, verified by its CA."""
        gateway = await RunningGateway.start(self)
        result = await gateway.curl("cacerts")
        self.assertEqual(result.status, 200, result.stderr)
        certs = decode_certs_only(result.body)
        self.assertEqual(len(certs), 2)
