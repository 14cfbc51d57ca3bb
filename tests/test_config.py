"""Config: every preset builds, overrides are typed and checked (the official values: test_official_yaml.py).

The official values below were read from facebookresearch/Mask2Former ``configs/`` (and detectron2's
defaults where a YAML leaves a key out); each assert names the YAML it checks.
"""

from __future__ import annotations

import re

import pytest

from m2f_lite.config import (
    PRESETS,
    Config,
    apply_overrides,
    config_diff,
    config_from_dict,
    get_config,
)
from m2f_lite.data.build import DATASETS
from m2f_lite.modeling.backbone import BACKBONES


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_a_consistent_config(name):
    cfg = get_config(name)
    assert isinstance(cfg, Config) and cfg.name == name
    assert cfg.model.backbone in BACKBONES
    assert cfg.data.dataset in DATASETS
    assert cfg.solver.lr_scheduler in ("step", "poly")
    assert all(s <= cfg.solver.max_iter for s in cfg.solver.steps)
    assert any((cfg.inference.semantic_on, cfg.inference.instance_on, cfg.inference.panoptic_on))
    assert config_from_dict(cfg.to_dict()) == cfg  # what checkpoints store round-trips


# The presets' values against the official YAMLs: tests/test_official_yaml.py (read by
# detectron2 itself from the official configs, tests/golden/official_yaml.json).


def test_overrides_typed_both_spellings():
    cfg = get_config(
        "shapes_tiny",
        ["--model.num_queries=5", "solver.base_lr=1e-3", "loss.deep_supervision=false"],
    )
    assert cfg.model.num_queries == 5 and isinstance(cfg.model.num_queries, int)
    assert cfg.solver.base_lr == 1e-3 and cfg.loss.deep_supervision is False
    cfg = apply_overrides(
        cfg, {"solver.steps": "[10, 20]", "data.crop_size": [32, 48], "solver.max_iter": 7}
    )
    assert (
        cfg.solver.steps == (10, 20) and cfg.data.crop_size == (32, 48) and cfg.solver.max_iter == 7
    )
    assert get_config("shapes_tiny").model.num_queries != 5  # presets are not mutated


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.nope=1", "unknown config key 'model.nope'"),
        ("nope.x=1", "has no field 'nope'"),
        ("model=1", "is a section"),
        ("model.num_queries=ten", "expected int"),
        ("loss.point_loss=maybe", "expected a boolean"),
        ("solver.steps=[1,x]", "expected a list"),
        ("model.num_queries", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_config("shapes_tiny", [override])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*shapes_tiny"):
        get_config("nope")


def test_config_diff_lists_changed_fields():
    a = get_config("shapes_tiny")
    b = get_config("shapes_tiny", ["model.num_queries=7", "seed=3"])
    assert config_diff(a, b) == [f"model.num_queries: {a.model.num_queries!r} -> 7", "seed: 0 -> 3"]
    assert config_diff(a, a) == []
