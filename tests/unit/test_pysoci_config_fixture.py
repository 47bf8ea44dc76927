"""The tests' config helper writes what pysoci reads, with a reserve independent of the host."""

from __future__ import annotations

from snapshotter.config import parse_config
from tests.fixtures.pysoci_config import TEST_RESERVE, pysoci_config


def test_fragments_merge_into_one_config_with_the_test_reserve() -> None:
    text = pysoci_config(
        'metrics_address = "127.0.0.1:1"\n[background_fetch]\ndisable = true\n',
        '[cache]\nmax_bytes = 1024\n[registry]\nconfig_path = "/tmp/a \\"b\\""\n',
        "[background_fetch]\nsilence_period_msec = 5\n[pull_modes.soci_v1]\nenable = false\n",
    )
    config, unknown = parse_config(text)
    assert unknown == []
    assert config.metrics_address == "127.0.0.1:1"
    assert config.background_fetch.disable and config.background_fetch.silence_period_msec == 5
    assert config.cache.max_bytes == 1024
    assert config.cache.min_free_bytes == TEST_RESERVE["min_free_bytes"]
    assert config.cache.min_free_percent == 0
    assert config.registry.config_path == '/tmp/a "b"'
    assert not config.pull_modes.soci_v1.enable


def test_a_reserve_the_test_sets_is_kept() -> None:
    config, _ = parse_config(pysoci_config("[cache]\nmin_free_percent = 7\n"))
    assert config.cache.min_free_percent == 7
    assert config.cache.min_free_bytes == 1 << 30  # pysoci's default, not the tests'
