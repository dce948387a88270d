"""nbp info: versions, devices and backend availability."""
import json

from nbp.cli import main


def test_info_json_lists_devices_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nbp"] and info["torch"]
    assert "cpu" in info["devices"]
    for key in ("packed_linear", "sample_cpu", "decode_attention_cpu", "decode_step_cpu"):
        assert info[key] is True or info[key].startswith("no (")
    backends = info["backends"]["cpu"]
    assert backends["torch"] is True and backends["reference"] is True
    assert backends["cuda"] is not True  # never usable on a CPU device


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device: cpu" in out
    assert "sample_cpu: " in out
