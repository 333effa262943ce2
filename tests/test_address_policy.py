"""Where a source may connect (streamstate/upstreams.py: AddressPolicy), without processes:
every spelling of a denied address is denied, IPv4 carried in IPv6 is judged by that IPv4,
and the cloud metadata addresses and the shared address space are in the defaults."""

import pytest

from streamstate.address_policy import DEFAULT_UPSTREAM_DENY, AddressPolicy, normal_address, parse_networks

pytestmark = pytest.mark.unit

DEFAULTS = AddressPolicy((), parse_networks(list(DEFAULT_UPSTREAM_DENY)))


@pytest.mark.parametrize(
    "address, carried",
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),  # mapped
        ("::7f00:1", "127.0.0.1"),  # IPv4-compatible
        ("::ffff:0:7f00:1", "127.0.0.1"),  # translated (SIIT)
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64, well-known prefix
        ("2002:7f00:1::1", "127.0.0.1"),  # 6to4
        ("[::ffff:0a00:1]", "10.0.0.1"),
    ],
)
def test_ipv4_carried_in_ipv6_is_judged_by_that_ipv4(address, carried):
    assert str(normal_address(address)) == carried


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "::7f00:1",
        "::ffff:0:7f00:1",
        "2002:7f00:1::1",
        "64:ff9b::7f00:1",
        "169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "fe80::1%eth0",
        "fd00:ec2::254",
        "fd20:ce::254",  # AWS's and GCP's IPv6 metadata
        "100.100.100.200",
        "100.64.0.1",  # Alibaba's metadata; shared address space
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        # Attack on issue 16: a local-use NAT64 prefix (the IPv4 anywhere in it), Teredo (the IPv4
        # obfuscated), Oracle Cloud Classic's metadata.
        "64:ff9b:1::7f00:1",
        "64:ff9b:1:7f00:1::",
        "64:ff9b:1::a9fe:a9fe",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
        "192.0.0.192",
    ],
)
def test_the_defaults_deny_this_host_metadata_and_the_shared_space(address):
    assert DEFAULTS.refusal(address, 80) is not None


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "2001:4860:4860::8888",
        "64:ff9b::808:808",
        "::ffff:8.8.8.8",
        "10.1.2.3",
        "192.168.1.10",
        "fd12:3456::1",
    ],
)
def test_public_and_private_networks_stay_allowed(address):
    """A provider may sit in a private network (10/8, 192.168/16, ULA): only this host, the
    metadata services, CGNAT space and multicast are denied by default."""
    assert DEFAULTS.refusal(address, 80) is None


def test_an_allowed_network_covers_every_spelling_of_it():
    policy = AddressPolicy(parse_networks(["127.0.0.0/8"]), parse_networks(list(DEFAULT_UPSTREAM_DENY)))
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "::7f00:1", "2002:7f00:1::1"):
        assert policy.refusal(address, 8080) is None
    assert policy.refusal("::1", 8080) is not None  # IPv6 loopback is not 127/8
