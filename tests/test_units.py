"""One size parser for every size option: decimal GB, binary GiB, bare numbers are bytes."""

from __future__ import annotations

import pytest

from softcli.units import format_bytes, parse_size


@pytest.mark.parametrize("text,value", [
    ("2GB", 2_000_000_000), ("2GiB", 2**31), ("2gb", 2_000_000_000), ("2G", 2_000_000_000), ("2Gi", 2**31),
    ("512MB", 512 * 10**6), ("512MiB", 512 * 2**20), ("64 mb", 64 * 10**6), ("1.5GiB", int(1.5 * 2**30)),
    ("3k", 3000), ("3KiB", 3072), ("1TB", 10**12), ("1TiB", 2**40), ("1000", 1000), ("1000B", 1000),
    ("1e6", 10**6), (" 8GB ", 8 * 10**9), (4096, 4096),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["lots", "-1GB", "0", "GB", "4XB", "", "2 G B", "0.5", "inf", "1e400GB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_format_bytes_reads_back():
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(2**31) == "2.0 GiB"
    assert parse_size(format_bytes(2**31).replace(" ", "")) == 2**31


@pytest.mark.parametrize("command", ["features", "segment", "classify", "profile"])
def test_max_memory_help_states_units(command):
    from typer.testing import CliRunner

    from softcli.cli.app import _register_commands, app

    _register_commands()
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    assert "--max-memory" in text and "2GB = 2·10⁹ bytes" in text and "2GiB = 2³¹ bytes" in text, text
