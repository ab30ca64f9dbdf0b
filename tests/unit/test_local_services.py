"""The port check of `genloop services up`: a port a server listens on is taken, a port that only
a stopped server's connections still hold (TIME_WAIT) is free, as it is for the servers."""

from __future__ import annotations

import socket

from genloop.orchestrate.local_services import HOST, _port_free


def _listener() -> socket.socket:
    """A listening socket set up as uvicorn sets up the Prefect and MLflow servers' (SO_REUSEADDR:
    the connections it leaves in TIME_WAIT carry the flag, and only then may a new bind pass them)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((HOST, 0))
    server.listen()
    return server


def test_a_port_a_server_listens_on_is_not_free():
    with _listener() as server:
        assert not _port_free(server.getsockname()[1])


def test_a_port_left_in_time_wait_by_a_stopped_server_is_free():
    server = _listener()
    port = server.getsockname()[1]
    client = socket.create_connection((HOST, port))
    accepted, _ = server.accept()
    accepted.close()  # the server's side closes first: its end waits in TIME_WAIT on `port`
    assert client.recv(1) == b""
    client.close()
    server.close()
    # the state the check must see past (about a minute after `genloop services down`)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
            left_in_time_wait = False
        except OSError:
            left_in_time_wait = True
    assert left_in_time_wait
    assert _port_free(port)
