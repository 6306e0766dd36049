"""The Hugging Face config.json key tables, read and written by one pair of functions."""

from hybridlm.checkpoint import hf_files, hf_nemotron
from tests.helpers import tiny_config


def test_a_field_left_to_its_default_is_written_as_its_resolved_value():
    """head_dim unset (None) means hidden_size / heads: config.json gets that number, not null, which transformers'
    NemotronHConfig would read as no head size."""
    config = tiny_config("M*-")
    assert config.head_dim is None
    hf = hf_files.hf_keys(config, hf_nemotron._KEYS, set(config.parsed.layers))
    assert hf["head_dim"] == config.resolved_head_dim == 8
