"""Small MaxMind-format databases, built for the tests with mmdb-writer.

Shaped like GeoLite2-Country (``country.iso_code``) and GeoLite2-ASN
(``autonomous_system_number``), IPv6 trees with IPv4 mapped in, as
MaxMind's own files are. The places are made up; the addresses are the
documentation ranges (and one carrier-grade NAT range with an ASN but no
country, for the "no country: compare the ASN" case).
"""

from __future__ import annotations

import os

from mmdb_writer import MMDBWriter, MmdbU32
from netaddr import IPSet

# network -> (country or None, ASN or None)
PLACES = {
    "192.0.2.0/24": ("DE", 3320),
    "198.51.100.0/24": ("AT", 8447),
    "203.0.113.0/24": ("FR", 3215),
    "100.64.0.0/24": (None, 64500),
    "2001:db8:1::/48": ("DE", 3320),
    "2001:db8:2::/48": ("JP", 2516),
}

# An address in each, for tests to log in from.
DE, AT, FR, ASN_ONLY = "192.0.2.77", "198.51.100.7", "203.0.113.9", "100.64.0.5"
DE6, JP6 = "2001:db8:1::5", "2001:db8:2:0:1::9"
UNKNOWN = "233.252.0.1"     # in neither database


def _writer(kind: str) -> MMDBWriter:
    return MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=kind,
                      languages=["en"], description="lastlogin test database")


def build(directory: str) -> tuple[str, str]:
    """(country database path, ASN database path), written into ``directory``."""
    country, asn = _writer("GeoLite2-Country"), _writer("GeoLite2-ASN")
    for net, (cc, number) in PLACES.items():
        if cc is not None:
            country.insert_network(IPSet([net]), {"country": {"iso_code": cc}})
        if number is not None:
            asn.insert_network(IPSet([net]), {
                "autonomous_system_number": MmdbU32(number),
                "autonomous_system_organization": f"Test AS{number}"})
    paths = (os.path.join(directory, "country.mmdb"), os.path.join(directory, "asn.mmdb"))
    country.to_db_file(paths[0])
    asn.to_db_file(paths[1])
    return paths
