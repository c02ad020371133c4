"""relay.couple: backpressure between two transports that never ends either one's life."""

from twisted.internet.testing import StringTransport

from txrdsproxy.proxy.relay import couple, uncouple


class Transport(StringTransport):
    connected = True

    def __init__(self):
        super().__init__()
        self.stopped = False

    def stopProducing(self):
        self.stopped = True


def test_full_side_pauses_the_other_and_resumes_it():
    client, backend = Transport(), Transport()
    couple(client, backend)
    client.producer.pauseProducing()
    assert backend.producerState == "paused"
    client.producer.resumeProducing()
    assert backend.producerState == "producing"


def test_closing_one_side_does_not_stop_the_other():
    # Twisted calls stopProducing on a closing transport's producer: the pooled peer survives.
    client, backend = Transport(), Transport()
    couple(client, backend)
    client.producer.stopProducing()
    assert not backend.stopped and backend.producerState == "producing"


def test_uncouple_unregisters_and_leaves_both_reading():
    client, backend = Transport(), Transport()
    couple(client, backend)
    client.producer.pauseProducing()
    uncouple(client, backend)
    assert client.producer is None and backend.producer is None
    assert backend.producerState == "producing" and client.producerState == "producing"
