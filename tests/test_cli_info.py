"""nbp info: versions, devices and backend availability."""
import json

from nbp.cli import main


def test_info_json_lists_devices_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nbp"] and info["torch"]
    assert "cpu" in info["devices"]
    assert info["packed_linear"] is True or info["packed_linear"].startswith("no (")
    backends = info["backends"]["cpu"]
    assert backends["torch"] is True and backends["reference"] is True
    assert backends["cuda"] is not True  # never usable on a CPU device


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device: cpu" in out
