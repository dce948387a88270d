"""Configs: every field checked for type and range when parsed; config.json checked before any build."""
import json

import pytest
import torch

from nbp import (TOKENIZER_PRESETS, TRANSFORMER_PRESETS, ConfigError, LoadError, NBPTransformer,
                 TokenizerConfig, TransformerConfig, VideoTokenizer)
from nbp.demo import DEMO_DIR
from nbp.native import CONFIG_FILE, read_native_config

TINY = TRANSFORMER_PRESETS["tiny"].to_dict()


@pytest.mark.parametrize("field,value,match", [
    ("n_layer", 2.5, r"n_layer: expected an int, got 2\.5"),
    ("n_layer", "2", r"n_layer: expected an int, got '2'"),
    ("n_layer", True, r"n_layer: expected an int, got True"),
    ("n_layer", 0, r"n_layer: expected an int >= 1, got 0"),
    ("n_head", None, r"n_head: expected an int, got None"),
    ("vocab_size", -1, r"vocab_size: expected an int >= 1"),
    ("cond_len", -3, r"cond_len: expected an int >= 0, got -3"),
    ("cond_vocab_size", -10, r"cond_vocab_size: expected an int >= 0, got -10"),
    ("dropout", 5, r"dropout: expected a number in \[0\.0, 1\.0\), got 5"),
    ("dropout", -0.1, r"dropout: expected a number in \[0\.0, 1\.0\)"),
    ("dropout", "0.1", r"dropout: expected a number"),
    ("hybrid", 1, r"hybrid: expected true or false, got 1"),
    ("bov", "yes", r"bov: expected true or false"),
    ("latent_shape", [3, 4], r"latent_shape: expected 3 ints >= 1, got \[3, 4\]"),
    ("latent_shape", None, r"latent_shape: expected 3 ints"),
    ("latent_shape", [3, 4.5, 4], r"latent_shape\[1\]: expected an int, got 4\.5"),
    ("block_shape", [1, 1, 0], r"block_shape\[2\]: expected an int >= 1, got 0"),
    ("latent_shape", [4000, 1000, 1000], r"max_seq_len: the position table has 128 rows, but a clip of "
                                          r"latent_shape \(4000, 1000, 1000\) needs 3999999996 positions"),
    ("max_seq_len", 43, r"max_seq_len: the position table has 43 rows, .* needs 44 positions"),
])
def test_transformer_fields(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TransformerConfig.from_dict({**TINY, field: value})


def test_max_seq_len_is_tied_to_the_layout():
    """The table holds exactly the teacher-forced input of a whole clip, for each layout."""
    base = dict(vocab_size=100, codebook_size=64, n_layer=1, n_head=1, n_embd=8, latent_shape=(3, 4, 4),
                block_shape=(1, 1, 4))
    layouts = {"plain": ({}, 48 - 4), "bov + class": (dict(bov=True, cond_len=1, cond_vocab_size=5), 1 + 4 + 48 - 4),
               "hybrid + text": (dict(bov=True, hybrid=True, cond_len=8, cond_vocab_size=5), 8 + 48)}
    for name, (kw, need) in layouts.items():
        cfg = TransformerConfig(**base, **kw, max_seq_len=need)
        assert cfg.context_len == need, name
        with pytest.raises(ConfigError, match=f"needs {need} positions"):
            TransformerConfig(**base, **kw, max_seq_len=need - 1)


def test_every_shipped_config_validates():
    for name, cfg in TRANSFORMER_PRESETS.items():
        assert TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
    for name, cfg in TOKENIZER_PRESETS.items():
        assert TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
    for sub, cls in (("nbp", NBPTransformer), ("ntp", NBPTransformer), ("tokenizer", VideoTokenizer)):
        cfg = read_native_config(DEMO_DIR / sub / CONFIG_FILE, cls.config_class, cls.model_type)
        assert isinstance(cfg, cls.config_class)


TOK = TOKENIZER_PRESETS["tiny"].to_dict()


@pytest.mark.parametrize("field,value,match", [
    ("strides", None, r"strides: expected a list"),
    ("strides", [[1, 2, 3], [2, 2, 2], [2, 2, 2]], r"strides: each entry must be three of 1 or 2"),
    ("strides", [[1, 2], [2, 2, 2], [2, 2, 2]], r"strides\[0\]: expected 3 ints"),
    ("encoder_units", [1, 0, 1, 1], r"encoder_units\[1\]: expected an int >= 1, got 0"),
    ("encoder_channels", [8, 16, 16], r"encoder_channels: expected 4 stages"),
    ("decoder_channels", "wide", r"decoder_channels: expected a non-empty list of ints"),
    ("kernel_size", 2.5, r"kernel_size: expected an int, got 2\.5"),
    ("kernel_size", 2, r"kernel_size: expected a positive odd int"),
    ("norm_groups", 0, r"norm_groups: expected an int >= 1"),
    ("in_channels", -3, r"in_channels: expected an int >= 1"),
    ("fsq_levels", [4, 1], r"fsq_levels\[1\]: expected an int >= 2"),
])
def test_tokenizer_fields(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TokenizerConfig.from_dict({**TOK, field: value})


@pytest.mark.parametrize("cls", [TransformerConfig, TokenizerConfig])
def test_from_dict_needs_an_object(cls):
    for bad in ([1, 2], None, "tiny"):
        with pytest.raises(ConfigError, match=f"expected a JSON object of {cls.__name__} fields"):
            cls.from_dict(bad)
    with pytest.raises(ConfigError, match=r"unknown .* fields \['n_layers'\]"):
        cls.from_dict({"n_layers": 2})


@pytest.fixture
def native_dir(tmp_path):
    torch.manual_seed(0)
    NBPTransformer(TRANSFORMER_PRESETS["tiny"]).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_config(path, text: bytes):
    (path / CONFIG_FILE).write_bytes(text)


@pytest.mark.parametrize("text,match", [
    (b"[1, 2]", r"config\.json: expected a JSON object of config fields, found list"),
    (b"null", r"config\.json: expected a JSON object of config fields, found NoneType"),
    (b'{"model_type": "nbp-transformer", "n_layer": "\xff\xfe"}', r"config\.json: not UTF-8 text"),
    (b"{n_layer: 2}", r"config\.json: not valid JSON"),
])
def test_unparseable_config_json(native_dir, text, match):
    _edit_config(native_dir, text)
    with pytest.raises(LoadError, match=match):
        NBPTransformer.from_pretrained(native_dir)


@pytest.mark.parametrize("field,value,match", [
    ("cond_vocab_size", -10, r"config\.json: invalid transformer config \(cond_vocab_size: expected an int >= 0"),
    ("cond_len", -3, r"config\.json: invalid transformer config \(cond_len: expected an int >= 0"),
    ("dropout", 5, r"config\.json: invalid transformer config \(dropout: expected a number in"),
    ("n_layer", 2.5, r"config\.json: invalid transformer config \(n_layer: expected an int, got 2\.5"),
    ("latent_shape", [4000, 1000, 1000], r"config\.json: invalid transformer config \(max_seq_len: "),
])
def test_invalid_fields_in_config_json(native_dir, field, value, match):
    cfg = json.loads((native_dir / CONFIG_FILE).read_text())
    _edit_config(native_dir, json.dumps({**cfg, field: value}).encode())
    with pytest.raises(LoadError, match=match):
        NBPTransformer.from_pretrained(native_dir)


def test_config_larger_than_its_file_is_refused_before_building(native_dir):
    """n_layer = 1e8 would take hours to build even on the meta device: the build is abandoned."""
    cfg = json.loads((native_dir / CONFIG_FILE).read_text())
    _edit_config(native_dir, json.dumps({**cfg, "n_layer": 100_000_000}).encode())
    with pytest.raises(LoadError, match=r"describes far more parameters than the file's \d+ tensors"):
        NBPTransformer.from_pretrained(native_dir)
    _edit_config(native_dir, json.dumps({**cfg, "n_layer": 3}).encode())  # a near miss: precise report
    with pytest.raises(LoadError, match=r"missing tensors: blocks\.2\."):
        NBPTransformer.from_pretrained(native_dir)


def test_huge_widths_are_compared_without_allocating(native_dir):
    cfg = json.loads((native_dir / CONFIG_FILE).read_text())
    _edit_config(native_dir, json.dumps({**cfg, "n_embd": 2 ** 20, "n_head": 2, "max_seq_len": 2 ** 30}).encode())
    with pytest.raises(LoadError, match=r"wrong shapes: .*expected \(1, 1073741824, 1048576\)"):
        NBPTransformer.from_pretrained(native_dir)


def test_tokenizer_config_json(tmp_path):
    VideoTokenizer(TokenizerConfig.from_preset("tiny")).save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / CONFIG_FILE).read_text())
    _edit_config(tmp_path / "t", json.dumps({**cfg, "encoder_units": [1, 1, 1, 10 ** 8]}).encode())
    with pytest.raises(LoadError, match="describes far more parameters"):
        VideoTokenizer.from_pretrained(tmp_path / "t")
    _edit_config(tmp_path / "t", json.dumps({**cfg, "strides": None}).encode())
    with pytest.raises(LoadError, match=r"config\.json: invalid tokenizer config \(strides: expected a list"):
        VideoTokenizer.from_pretrained(tmp_path / "t")
