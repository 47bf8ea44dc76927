"""Config parsing: soci's keys and defaults, unknown keys reported, wrong types refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.config import (
    Config,
    ConfigError,
    HttpConfig,
    fetch_config,
    load_config,
    parse_config,
)
from snapshotter.dataplane.lazy import LazyLayers

SOCI_STYLE = """
[http]
MaxRetries = 3
DialTimeoutMsec = 1000

[[resolver.host."docker.io".mirrors]]
host = "mirror.example:5000"
insecure = true

[[resolver.host."docker.io".mirrors]]
host = "second.example"
header = { X-Test = "1" }

[registry]
config_path = "/etc/pysoci/certs.d"

[fuse]
attr_timeout = 1

[background_fetch]
silence_period_msec = 100

[pull_modes.soci_v1]
enable = false

[content_store]
type = "containerd"
"""


def test_defaults_are_socis() -> None:
    assert Config().http == HttpConfig(3000, 3000, 300_000, 8, 30, 300_000)


def test_soci_style_file() -> None:
    config, unknown = parse_config(SOCI_STYLE)
    assert config.http.MaxRetries == 3 and config.http.DialTimeoutMsec == 1000
    assert config.http.MinWaitMsec == 30
    mirrors = config.resolver.host["docker.io"].mirrors
    assert [(m.host, m.insecure) for m in mirrors] == [
        ("mirror.example:5000", True),
        ("second.example", False),
    ]
    assert mirrors[1].header == {"X-Test": "1"}
    assert config.registry.config_path == "/etc/pysoci/certs.d"
    assert config.fuse.attr_timeout == 1 and config.fuse.entry_timeout == 60
    assert not config.pull_modes.soci_v1.enable and config.pull_modes.soci_v2.enable
    fetch = fetch_config(config)
    assert fetch.silence_period_msec == 100 and fetch.max_span_verification_retries == 1
    # Sections pysoci does not implement are reported, not silently dropped.
    assert unknown == ["content_store"]


@pytest.mark.parametrize(
    "text",
    [
        "[http]\nMaxRetries = 'three'",
        "[http]\nMaxRetries = -1",
        "[http]\nMaxRetries = true",
        "http = 3",
        "[[resolver.host.'x'.mirrors]]\ninsecure = true",
        "[resolver.host.'x']\nmirrors = 'nope'",
        "not toml [",
    ],
)
def test_bad_values_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text)


def test_load_reports_unknown_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[http]\nMaxRetrys = 1\n")
    config, unknown = load_config(path)
    assert unknown == ["http.MaxRetrys"]
    assert config.http.MaxRetries == 8
    assert "unknown key http.MaxRetrys" in caplog.text
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_fuse_opaque_xattr_reaches_the_fuse_tree(tmp_path: Path) -> None:
    assert Config().fuse.opaque_xattr == "trusted.overlay.opaque"
    config, unknown = parse_config('[fuse]\nopaque_xattr = "user.overlay.opaque"\n')
    assert unknown == [] and config.fuse.opaque_xattr == "user.overlay.opaque"
    # LazyLayers hands it to the FUSE session's inode table, which builds every layer's tree.
    lazy = LazyLayers(config, tmp_path / "fuse", tmp_path / "cache")
    assert lazy.session.table.opaque_xattr == "user.overlay.opaque"
    with pytest.raises(ConfigError, match="opaque_xattr"):
        parse_config('[fuse]\nopaque_xattr = "trusted.overlay.opaqe"\n')


def test_blob_valid_interval() -> None:
    assert Config().blob.valid_interval == 60  # soci's default
    config, unknown = parse_config("[blob]\nvalid_interval = 5\n")
    assert config.blob.valid_interval == 5 and unknown == []
    for bad in ("-1", "'60'", "1.5"):
        with pytest.raises(ConfigError, match=r"blob\.valid_interval"):
            parse_config(f"[blob]\nvalid_interval = {bad}\n")


def test_fetch_settings_have_one_source_of_defaults() -> None:
    """FetchConfig has no defaults of its own: fetch_config fills every field from Config."""
    import dataclasses

    from snapshotter.fetch.config import FetchConfig

    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(FetchConfig))
    settings, config = fetch_config(), Config()
    assert settings.silence_period_msec == config.background_fetch.silence_period_msec
    assert settings.cache_max_bytes == config.cache.max_bytes
    assert settings.max_request_bytes == config.fetch.max_request_bytes
    assert fetch_config(readahead_spans=0).readahead_spans == 0
    with pytest.raises(TypeError):
        fetch_config(no_such_setting=1)
