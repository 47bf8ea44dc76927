"""The daemon and the pysoci commands get their registry client from one place, so every
setting reaches both (the CLI's client used to miss `[blob] force_single_range_mode`)."""

from __future__ import annotations

import argparse

from snapshotter import daemon
from snapshotter.cli.registry_args import registry_client
from snapshotter.config import parse_config
from snapshotter.registry.reference import parse_reference


def test_both_clients_follow_the_config() -> None:
    config, unknown = parse_config("[blob]\nforce_single_range_mode = true\n")
    assert unknown == []
    args = argparse.Namespace(user="bob:secret", plain_http=True, skip_verify=False)
    ref = parse_reference("registry.test:5000/app:v1")
    cli = registry_client(args, config, [ref])
    node = daemon.registry_client(config)
    for client in (cli, node):
        assert client.ranges.force_single_range is True
    assert cli.hosts.endpoints("registry.test:5000", "pull")[0].url.startswith("http://")
    assert node.hosts.endpoints("registry.test:5000", "pull")[0].url.startswith("https://")
