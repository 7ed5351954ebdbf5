from esplanade.keyexchange.ikev2.events import ChildSaEstablished, IkeSaEstablished
from tests.keyexchange.peers import pair


def test_psk_establish() -> None:
    net, a, b = pair()
    a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(IkeSaEstablished) and b.of(IkeSaEstablished), (a.events, b.events)
    ca = a.of(ChildSaEstablished)[0].record
    cb = b.of(ChildSaEstablished)[0].record
    assert ca.outbound.spi == cb.inbound.spi and ca.inbound.spi == cb.outbound.spi
    assert ca.outbound.encr_key == cb.inbound.encr_key
    assert ca.inbound.encr_key == cb.outbound.encr_key
