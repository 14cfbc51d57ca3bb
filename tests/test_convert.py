"""Official-weight conversion: official names round-trip exactly, .pkl/.pth files load, malicious
pickles are refused, mismatches are named, and `convert_main` writes loadable checkpoints."""

import os
import pickle

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from m2f_lite.config import config_from_dict, get_config
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.weights.convert import convert_main
from m2f_lite.weights.detectron2 import (
    convert_detectron2,
    detectron2_backbone_name,
    load_official,
    to_detectron2,
)
from m2f_lite.weights.keys import ConversionError, check_state_dict

PRESET = "shapes_tiny"
# pinned so that the shapes below hold whatever the preset becomes
TINY = [
    "model.backbone=resnet18",
    "model.backbone_norm=frozen_bn",
    "model.num_classes=7",
    "model.num_queries=20",
    "model.hidden_dim=64",
    "model.nheads=4",
    "model.dim_feedforward=128",
    "model.dec_layers=3",
    "model.conv_dim=64",
    "model.mask_dim=64",
    "model.enc_layers=2",
    "model.enc_nheads=4",
    "model.enc_dim_feedforward=128",
]


def tiny_model(seed, preset_only=False):
    torch.manual_seed(seed)
    frozen = ["model.backbone_norm=frozen_bn"]  # official weights: detectron2's FrozenBN
    return build_model(get_config(PRESET, frozen if preset_only else TINY)).eval()


def official(model):
    """The model's weights under the official names, as numpy arrays (what a model-zoo .pkl holds)."""
    sd = to_detectron2(model.state_dict(), backbone="resnet18")
    return {k: v.numpy() for k, v in sd.items()}


def test_official_names_and_exact_round_trip():
    model = tiny_model(0)
    sd = model.state_dict()
    off = to_detectron2(sd, backbone="resnet18")
    # names and shapes of the official MSDeformAttnPixelDecoder / MultiScaleMaskedTransformerDecoder
    pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
    expected_shapes = {
        pd + "input_proj.0.0.weight": (64, 512, 1, 1),  # res5 first
        pd + "input_proj.2.1.bias": (64,),
        pd + "transformer.level_embed": (3, 64),
        pd + "transformer.encoder.layers.1.self_attn.sampling_offsets.weight": (4 * 3 * 4 * 2, 64),
        pd + "transformer.encoder.layers.0.self_attn.attention_weights.bias": (4 * 3 * 4,),
        pd + "transformer.encoder.layers.0.linear1.weight": (128, 64),
        pd + "transformer.encoder.layers.0.norm2.weight": (64,),
        pd + "adapter_1.weight": (64, 64, 1, 1),
        pd + "adapter_1.norm.weight": (64,),
        pd + "layer_1.weight": (64, 64, 3, 3),
        pd + "layer_1.norm.bias": (64,),
        pd + "mask_features.weight": (64, 64, 1, 1),
        pr + "query_feat.weight": (20, 64),
        pr + "query_embed.weight": (20, 64),
        pr + "level_embed.weight": (3, 64),
        pr + "transformer_cross_attention_layers.2.multihead_attn.in_proj_weight": (192, 64),
        pr + "transformer_cross_attention_layers.0.multihead_attn.out_proj.bias": (64,),
        pr + "transformer_cross_attention_layers.0.norm.weight": (64,),
        pr + "transformer_self_attention_layers.1.self_attn.in_proj_bias": (192,),
        pr + "transformer_self_attention_layers.1.norm.bias": (64,),
        pr + "transformer_ffn_layers.0.linear1.weight": (128, 64),
        pr + "transformer_ffn_layers.0.norm.weight": (64,),
        pr + "decoder_norm.weight": (64,),
        pr + "class_embed.weight": (8, 64),
        pr + "mask_embed.layers.2.bias": (64,),
        "backbone.stem.conv1.weight": (64, 3, 7, 7),
        "backbone.res2.0.conv1.norm.running_mean": (64,),
        "backbone.res3.0.shortcut.weight": (128, 64, 1, 1),
    }
    for key, shape in expected_shapes.items():
        assert tuple(off[key].shape) == shape, key
    assert not any(".layers.3." in k for k in off if k.startswith(pr))  # 3 decoder layers
    assert len(off) == len([k for k in sd if not k.endswith("num_batches_tracked")])

    back, report = convert_detectron2(off, backbone="resnet18")
    assert report.ok and report.backbone == "resnet18"
    assert check_state_dict(model, back).ok
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in back)
    off2 = to_detectron2(back, backbone="resnet18")
    assert set(off2) == set(off) and all(torch.equal(off2[k], off[k]) for k in off)


@pytest.mark.parametrize("protocol", [4])
def test_pkl_file_loads_into_a_fresh_model(tmp_path, protocol):
    source = tiny_model(0)
    weights = official(source)
    weights["criterion.empty_weight"] = np.ones(8, dtype=np.float32)  # in official checkpoints
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"model": weights, "__author__": "test", "matching_heuristics": True},
            f,
            protocol=protocol,
        )
    target = tiny_model(1)
    report = load_official(target, path)
    assert report.ignored == ["criterion.empty_weight"]
    image = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        torch.testing.assert_close(
            target(image)["pred_masks"], source(image)["pred_masks"], atol=0, rtol=0
        )


def test_pth_file_loads(tmp_path):
    source = tiny_model(0)
    path = tmp_path / "model_final.pth"
    torch.save(
        {"model": to_detectron2(source.state_dict(), backbone="resnet18"), "iteration": 7}, path
    )
    target = tiny_model(1)
    load_official(target, path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(target.state_dict().values(), source.state_dict().values())
    )


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickles_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": Exploit()}}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        convert_detectron2(path)
    evil_pth = tmp_path / "evil.pth"
    with open(evil_pth, "wb") as f:
        pickle.dump({"model": {"x": Exploit()}}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        convert_detectron2(evil_pth)
    assert not (tmp_path / "pwned").exists()


def test_mismatches_are_named(tmp_path):
    weights = official(tiny_model(0))
    del weights["sem_seg_head.predictor.decoder_norm.bias"]
    weights["sem_seg_head.predictor.class_embed.weight"] = np.zeros((11, 64), dtype=np.float32)
    weights["sem_seg_head.predictor.something_new"] = np.zeros(3, dtype=np.float32)
    path = tmp_path / "bad.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights}, f)
    with pytest.raises(ConversionError) as e:
        load_official(tiny_model(1), path)
    message = str(e.value)
    assert "transformer_decoder.decoder_norm.bias" in message  # missing
    assert "transformer_decoder.class_embed.weight: model (8, 64), weights (11, 64)" in message
    assert "something_new" in message  # unexpected


def test_backbone_is_recognised_from_official_shapes():
    def resnet(blocks, bottleneck=True):
        sd = {"backbone.stem.conv1.weight": torch.zeros(1)}
        sd.update({f"backbone.res4.{i}.conv1.weight": torch.zeros(1) for i in range(blocks)})
        if bottleneck:
            sd["backbone.res2.0.conv3.weight"] = torch.zeros(1)
        return sd

    assert detectron2_backbone_name(resnet(6)) == "resnet50"
    assert detectron2_backbone_name(resnet(23)) == "resnet101"
    assert detectron2_backbone_name(resnet(2, bottleneck=False)) == "resnet18"

    def swin(embed_dim, stage3_blocks, window):
        sd = {
            "backbone.patch_embed.proj.weight": torch.zeros(embed_dim, 3, 4, 4),
            "backbone.layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(
                (2 * window - 1) ** 2, 3
            ),
        }
        sd.update(
            {
                f"backbone.layers.2.blocks.{i}.norm1.weight": torch.zeros(1)
                for i in range(stage3_blocks)
            }
        )
        return sd

    assert detectron2_backbone_name(swin(96, 6, 7)) == "swin_tiny"
    assert detectron2_backbone_name(swin(96, 18, 7)) == "swin_small"
    assert detectron2_backbone_name(swin(128, 18, 12)) == "swin_base_384"
    assert detectron2_backbone_name(swin(192, 18, 12)) == "swin_large_384"
    with pytest.raises(ConversionError, match="backbone"):
        detectron2_backbone_name({"sem_seg_head.predictor.query_feat.weight": torch.zeros(1)})


def test_convert_main_detectron2_writes_a_loadable_checkpoint(tmp_path):
    source = tiny_model(0, preset_only=True)
    src = tmp_path / "model_final.pkl"
    with open(src, "wb") as f:
        pickle.dump({"model": official(source)}, f)
    dst = tmp_path / "out" / "converted.pt"
    convert_main(str(src), str(dst))  # no other preset has its model fields
    ckpt = torch.load(dst, weights_only=True)
    cfg = config_from_dict(ckpt["config"])
    assert (
        cfg.name == PRESET
        and cfg.model == get_config(PRESET, ["model.backbone_norm=frozen_bn"]).model
    )
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values())
    )
    assert [p.name for p in dst.parent.iterdir()] == ["converted.pt"]  # no temporary file left
    with pytest.raises(ConversionError, match="preset"):
        convert_main(str(src), str(dst), preset="coco_panoptic_r50")


def test_convert_main_transformers_folder(tmp_path):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    m = get_config(PRESET).model
    backbone = ResNetConfig(
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        layer_type="basic",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # resnet18
    hf_config = Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=m.num_classes,
        num_queries=m.num_queries,
        feature_size=m.conv_dim,
        mask_feature_size=m.mask_dim,
        hidden_dim=m.hidden_dim,
        encoder_feedforward_dim=m.enc_dim_feedforward,
        dim_feedforward=m.dim_feedforward,
        encoder_layers=m.enc_layers,
        decoder_layers=m.dec_layers + 1,
        num_attention_heads=m.nheads,
    )
    torch.manual_seed(0)
    hf = Mask2FormerForUniversalSegmentation(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert_main(str(tmp_path / "hf"), str(tmp_path / "converted.pt"), preset=PRESET)
    ckpt = torch.load(tmp_path / "converted.pt", weights_only=True)
    model = build_model(config_from_dict(ckpt["config"])).eval()
    model.load_state_dict(ckpt["model"])
    image = torch.rand(1, 3, 64, 96) * 255
    mean = torch.tensor(m.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(m.pixel_std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = hf(pixel_values=(image - mean) / std).masks_queries_logits
        torch.testing.assert_close(model(image)["pred_masks"], expected, atol=1e-4, rtol=0)


def test_convert_main_refuses_a_backbone_no_preset_has(tmp_path):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    backbone = ResNetConfig(
        depths=[1, 1, 1, 1],
        hidden_sizes=[64, 128, 256, 512],
        layer_type="basic",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    hf_config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=64,
        mask_feature_size=64,
        hidden_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=4,
        num_queries=5,
    )
    Mask2FormerForUniversalSegmentation(hf_config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="no preset"):
        convert_main(str(tmp_path / "hf"), str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()


def test_a_converted_official_checkpoint_evaluates_in_fp32_unless_told(
    tmp_path, monkeypatch, capsys
):
    """detectron2 evaluates in fp32 whatever SOLVER.AMP says: `m2f-lite eval` of a converted
    checkpoint asks for no autocast (inference.amp=off), even with training AMP on."""
    from m2f_lite import cli, evaluation
    from m2f_lite.data import synthetic

    root = synthetic.generate(tmp_path / "shapes", n_train=2, n_val=2, size=48, seed=0)
    src, dst = tmp_path / "model_final.pkl", tmp_path / "converted.pt"
    with open(src, "wb") as f:
        pickle.dump({"model": official(tiny_model(0, preset_only=True))}, f)
    convert_main(str(src), str(dst), preset=PRESET)
    cfg = config_from_dict(torch.load(dst, weights_only=True)["config"])
    assert cfg.inference.amp == "off"
    official_cfg = get_config("coco_panoptic_r50")  # trains as the official: fp16 + GradScaler
    assert (official_cfg.solver.amp, official_cfg.inference.amp) == ("fp16", "off")

    asked = []
    real = evaluation.autocast_dtype

    def spy(amp, device, *, key="solver.amp"):
        asked.append((key, amp, real(amp, torch.device("cuda"), key=key)))  # as on a GPU
        return real(amp, device, key=key)

    monkeypatch.setattr(evaluation, "autocast_dtype", spy)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    args = ["eval", str(dst), f"--data.root={root}", "--device=cpu"]
    assert cli.main(args) == 0
    assert cli.main([*args, "--solver.amp=fp16"]) == 0  # training precision: not evaluation's
    assert cli.main([*args, "--inference.amp=bf16"]) == 0
    assert asked == [
        ("inference.amp", "off", None),
        ("inference.amp", "off", None),
        ("inference.amp", "bf16", torch.bfloat16),
    ]
    assert "PQ" in capsys.readouterr().out
