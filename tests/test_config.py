"""The typed config: defaults, YAML round trip, refusal of bad input by dotted path, fuzzing."""
from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memtrack.config import (Config, DataConfig, DetectorsConfig, EmbedderSpec, describe, from_dict,
                             load_config)
from memtrack.errors import ConfigError, MemtrackError


def test_defaults_are_the_published_ones():
    cfg = load_config()
    assert cfg.detectors.nn_ratio == pytest.approx(1 / 3)          # Gu et al.
    assert cfg.detectors.tiled_l2 == 0.15 and cfg.detectors.tiled_grid == 4   # Carlini et al.
    assert cfg.detectors.adaptive_alpha == 0.5 and cfg.detectors.adaptive_n == 50
    assert cfg.detectors.copy is None    # each descriptor's own: SSCD's published 0.5, CLIP's calibrated
    assert cfg.index.embedders == [EmbedderSpec("pixel", {})]
    assert cfg.sampling.scheduler == "ddim" and cfg.sampling.device == "cpu"
    assert cfg.dynamics.baseline_rate == 0.01 and cfg.dynamics.persistence == 2
    # defaults are independent objects, not shared mutable state
    a, b = Config(), Config()
    a.index.embedders.append(EmbedderSpec("clip", {}))
    assert len(b.index.embedders) == 1


def test_every_field_is_documented():
    rows = describe()
    assert len(rows) > 30
    assert all(help_text for _, _, help_text in rows), [r for r in rows if not r[2]]
    assert ("sampling.num_samples", "64", rows[[r[0] for r in rows].index("sampling.num_samples")][2]) in rows


def test_yaml_round_trip(tmp_path):
    cfg = load_config(overrides={"sampling.num_samples": 7, "detectors.tiled_l2": 0.2})
    cfg.index.embedders = [EmbedderSpec("pixel", {"resolution": 16}), EmbedderSpec("clip", {"model": "ViT-B-32"})]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(path)
    assert again == cfg
    assert again.copy() == cfg and again.copy() is not again


def test_partial_file_keeps_other_defaults_and_flat_embedder_forms(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  num_samples: 12\nindex:\n  embedders: [pixel, {name: clip, model: ViT-B-32}]\n")
    cfg = load_config(path)
    assert cfg.sampling.num_samples == 12 and cfg.sampling.batch_size == 32
    assert cfg.index.embedders == [EmbedderSpec("pixel", {}), EmbedderSpec("clip", {"model": "ViT-B-32"})]
    assert cfg.detectors == DetectorsConfig()


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == Config()


def test_unknown_field_names_the_dotted_path(tmp_path):
    with pytest.raises(ConfigError, match=r"sampling: unknown field 'num_sample'") as err:
        from_dict(Config, {"sampling": {"num_sample": 3}})
    assert err.value.hint.startswith("did you mean 'num_samples'?")  # the closest known field, then all of them
    with pytest.raises(ConfigError, match=r"config: unknown field 'sampler'"):
        from_dict(Config, {"sampler": {}})
    path = tmp_path / "c.yaml"
    path.write_text("detectors:\n  nn_ratioo: 0.3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: detectors: unknown field 'nn_ratioo'"):
        load_config(path)


@pytest.mark.parametrize("section,field,value,words", [
    ("sampling", "num_samples", "many", "sampling.num_samples: expected an integer, got 'many'"),
    ("sampling", "num_samples", 3.5, "sampling.num_samples: expected an integer"),
    ("sampling", "num_samples", True, "sampling.num_samples: expected an integer"),
    ("sampling", "prefer_ema", "yes", "sampling.prefer_ema: expected true or false"),
    ("detectors", "tiled_l2", "0.1", "detectors.tiled_l2: expected a number"),
    ("detectors", "nn_ratio", float("nan"), "detectors.nn_ratio: expected a finite number"),
    ("detectors", "copy", float("inf"), "detectors.copy: expected a finite number"),
    pytest.param("detectors", "copy", 10 ** 400, "detectors.copy: expected a finite number", id="huge-int"),
    ("sampling", "device", 0, "sampling.device: expected a string"),
    ("sampling", "pretrained_model", 3, "sampling.pretrained_model: expected str or NoneType"),
    ("index", "embedders", "pixel", "index.embedders: expected a list"),
    ("index", "embedders", [{"model": "x"}], "index.embedders[0]: an embedder needs a 'name'"),
    ("index", "embedders", [3], "index.embedders[0]: expected an embedder name or mapping"),
    ("sampling", "num_samples", 0, "sampling.num_samples must be > 0"),
    ("detectors", "adaptive_alpha", 0, "detectors.adaptive_alpha must be > 0"),
    ("dynamics", "baseline_rate", 1.5, "dynamics.baseline_rate must be in [0, 1)"),
    ("index", "index_type", "annoy", "index.index_type must be one of auto, flat, hnsw, ivf_flat, ivf_pq"),
    ("index", "recall_target", 1.5, "index.recall_target must be in (0, 1]"),
    ("index", "memory_budget", "lots", "index.memory_budget: memory budget 'lots' is not a size"),
])
def test_wrong_types_and_values_name_the_field(section, field, value, words):
    with pytest.raises(ConfigError) as err:
        from_dict(Config, {section: {field: value}})
    assert words in err.value.message


def test_ints_are_accepted_for_floats_and_nulls_for_optionals():
    cfg = from_dict(Config, {"detectors": {"tiled_l2": 1}, "sampling": {"pretrained_model": None}})
    assert cfg.detectors.tiled_l2 == 1.0 and isinstance(cfg.detectors.tiled_l2, float)
    assert cfg.sampling.pretrained_model is None


def test_literal_choices():
    assert from_dict(Config, {"sampling": {"scheduler": "ddpm"}}).sampling.scheduler == "ddpm"
    with pytest.raises(ConfigError) as err:
        from_dict(Config, {"sampling": {"scheduler": "euler"}})
    assert "sampling.scheduler: must be one of 'ddim' | 'ddpm' | 'run', got 'euler'" in err.value.message
    with pytest.raises(ConfigError, match="sampling.dtype"):
        from_dict(Config, {"sampling": {"dtype": "float64"}})


def test_a_section_with_every_field_commented_out_gives_its_defaults(tmp_path):
    path = tmp_path / "sections.yaml"
    path.write_text("sampling:\n  # num_samples: 64\ndata:\n  caption_column: caption\n")
    cfg = load_config(path)
    assert cfg.sampling == Config().sampling
    assert cfg.data.caption_column == "caption"


def test_a_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="sampling: expected a mapping of fields, got list"):
        from_dict(Config, {"sampling": [1, 2]})
    with pytest.raises(ConfigError, match="config: expected a mapping of fields"):
        from_dict(Config, "sampling")


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  num_samples: 12\n  seed: 3\n")
    cfg = load_config(path, overrides={"sampling.num_samples": 4, "detectors.copy": 0.75, "sampling.seed": None})
    assert cfg.sampling.num_samples == 4 and cfg.detectors.copy == 0.75
    assert cfg.sampling.seed == 3  # None means "flag not given": the file's value stays
    with pytest.raises(ConfigError, match="num_samples: expected an integer"):
        load_config(overrides={"sampling.num_samples": "x"})
    with pytest.raises(ConfigError, match="unknown field 'nope'"):
        load_config(overrides={"sampling.nope": 1})
    with pytest.raises(ConfigError, match="is not a section"):
        load_config(path, overrides={"sampling.num_samples.deeper": 1})


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config("/nonexistent/memtrack.yaml")
    assert err.value.hint


@pytest.mark.parametrize("text,words", [
    ("- a\n- b\n", "the top level must be a mapping of sections, got list"),
    ("just a string\n", "the top level must be a mapping of sections, got str"),
    ("sampling: {num_samples: [\n", "is not valid YAML"),
    ("sampling:\n\tnum_samples: 3\n", "is not valid YAML"),
    ("a: !!python/object/apply:os.system ['true']\n", "is not valid YAML"),  # safe_load refuses tags
    ("sampling:\n  num_samples: 1" + "0" * 5000 + "\n", "is not valid YAML"),  # int over 4,300 digits
    ("[" * 5000, "is not valid YAML"),
])
def test_bad_yaml_files(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert words in err.value.message and "c.yaml" in err.value.message


def test_non_utf8_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"sampling:\n  device: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(path)


def test_huge_ints_do_not_break_error_messages():
    for data in ({"sampling": {"device": 10 ** 5000}}, {10 ** 5000: 1}, {"sampling": {"num_samples": -10 ** 5000}}):
        with pytest.raises(ConfigError, match="too large to print"):
            from_dict(Config, data)


# ------------------------------------------------------------------------------------------- fuzzing

# integers up to 10**400 reach float()'s OverflowError (it used to escape from_dict)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                     st.integers(min_value=-(10 ** 400), max_value=10 ** 400))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)


def _sections():
    """Mappings that look like configs: real section and field names, random values; plus junk keys."""
    fields = {
        "data": list(DataConfig.__dataclass_fields__),
        "sampling": ["num_samples", "scheduler", "dtype", "seed", "pretrained_model", "guidance_scale", "prefer_ema"],
        "detectors": list(DetectorsConfig.__dataclass_fields__),
        "index": ["embedders", "k", "index_type", "baseline_k"],
        "dynamics": ["baseline_rate", "persistence", "loss_gap"],
    }
    section = st.sampled_from(sorted(fields)).flatmap(
        lambda s: st.tuples(st.just(s), st.dictionaries(st.sampled_from(fields[s] + ["bogus"]), _VALUES, max_size=4)
                            | _VALUES))
    embedders = st.lists(st.one_of(st.text(max_size=6), st.dictionaries(
        st.sampled_from(["name", "options", "model"]), _VALUES, max_size=3), _VALUES), max_size=3)
    return st.one_of(
        st.lists(section, max_size=4).map(dict),
        st.builds(lambda e: {"index": {"embedders": e}}, embedders),
        _VALUES,
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_sections())
def test_fuzz_from_dict_raises_only_config_errors(data):
    try:
        cfg = from_dict(Config, data)
    except ConfigError as exc:
        assert exc.message and len(exc.message) < 2000
        return
    # whatever is accepted is a valid, finite config
    assert isinstance(cfg, Config)
    assert math.isfinite(cfg.detectors.nn_ratio) and cfg.detectors.nn_ratio > 0
    assert all(isinstance(e, EmbedderSpec) for e in cfg.index.embedders)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_yaml_text_raises_only_config_errors(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except MemtrackError as exc:
        assert isinstance(exc, ConfigError)
