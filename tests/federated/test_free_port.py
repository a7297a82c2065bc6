"""free_port picks ports no outgoing connection can take before a server binds them."""

import socket

import pytest

from evoclone.federated.flower import runtime
from evoclone.federated.flower.runtime import PortInUseError, free_port, port_is_free


def test_ports_lie_outside_the_kernels_ephemeral_range_and_are_bindable():
    ephemeral = runtime._ephemeral_ports()
    picked = {free_port() for _ in range(50)}
    assert len(picked) > 40  # drawn at random, not a fixed sequence
    for port in picked:
        assert port not in ephemeral and port >= 10000
        assert port_is_free(port)
    base = free_port(block=3)
    assert all(p not in ephemeral and port_is_free(p) for p in range(base, base + 3))


def test_a_port_an_outgoing_connection_holds_is_never_picked(monkeypatch):
    """The race the ephemeral range causes: a client's local port is not bindable by a server."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname())
        try:
            held = client.getsockname()[1]
            assert not port_is_free(held)
            assert held in runtime._ephemeral_ports()  # where the kernel put it, and where free_port never looks
            # with nothing left but the held port, free_port refuses rather than hand it out
            monkeypatch.setattr(runtime, "_ephemeral_ports", lambda: range(held + 1, 65536))
            monkeypatch.setattr(runtime, "_LOWEST_PICKED_PORT", held)
            with pytest.raises(PortInUseError, match="no 1 free consecutive"):
                free_port()  # the kernel's own pick is the fallback only when no port lies outside its range
        finally:
            client.close()


def test_the_range_is_read_from_the_kernel_setting(tmp_path):
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("20000\t40000\n")
    assert runtime._ephemeral_ports(setting) == range(20000, 40001)
    assert runtime._ephemeral_ports(tmp_path / "missing") == range(32768, 61000)  # Linux's default


def test_with_every_port_ephemeral_a_single_port_comes_from_the_kernel(monkeypatch):
    monkeypatch.setattr(runtime, "_ephemeral_ports", lambda: range(1024, 65536))
    assert port_is_free(free_port())
    with pytest.raises(PortInUseError, match="found no 2 free consecutive"):
        free_port(block=2)
