"""SAM modules against the independent reference ``segment_anything`` (1.0) on the same random weights.

``segment_anything`` imports torchvision at package import (``utils/transforms.py``:
``resize, to_pil_image``; ``automatic_mask_generator.py``: ``batched_nms, box_area``), which does
not import beside this torch build: a stand-in module providing those four names (never called
here) is put into ``sys.modules`` before the import. Both sides are built at small sizes (64 px,
patch 8, width 32, window 3 so that windows are padded, global attention at blocks 1 and 3).
"""

from __future__ import annotations

import sys
import types
from functools import partial

import pytest
import torch
from torch import nn

from custom_components.io import InputDataError
from custom_components.networks.sam import (
    SAMBoxSegmenter,
    load_lvmmed_vit_encoder,
    load_sam_checkpoint,
    sam_box_segmenter,
)


def _reference():
    """``segment_anything.modeling``, imported with a torchvision stand-in that is removed again afterwards.

    The stand-in stays out of ``sys.modules`` after the import, so other tests' optional torchvision
    imports (MONAI's ``optional_import``) still see torchvision as absent.
    """
    # (importing MONAI already tried ``segment_anything.build_sam`` for its CellSamWrapper: that
    # failed on torchvision and left the submodules, not the package, in sys.modules)
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        return pytest.importorskip("segment_anything.modeling")

    def _unused(*args, **kwargs):
        raise NotImplementedError("test stand-in for torchvision")

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
             "torchvision.ops.boxes")
    stub = {name: types.ModuleType(name) for name in names}
    stub["torchvision.transforms.functional"].resize = _unused
    stub["torchvision.transforms.functional"].to_pil_image = _unused
    stub["torchvision.ops.boxes"].batched_nms = _unused
    stub["torchvision.ops.boxes"].box_area = _unused
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(stub)
    try:
        return pytest.importorskip("segment_anything.modeling")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


SMALL = dict(
    img_size=64,
    patch_size=8,
    encoder_embed_dim=32,
    encoder_depth=4,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1, 3),
    window_size=3,
    prompt_embed_dim=16,
    mask_in_chans=8,
    decoder_depth=2,
    decoder_num_heads=2,
    decoder_mlp_dim=32,
    iou_head_hidden_dim=16,
)


def _reference_sam(m, use_abs_pos: bool = True):
    grid = SMALL["img_size"] // SMALL["patch_size"]
    dim = SMALL["prompt_embed_dim"]
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=SMALL["img_size"],
            patch_size=SMALL["patch_size"],
            embed_dim=SMALL["encoder_embed_dim"],
            depth=SMALL["encoder_depth"],
            num_heads=SMALL["encoder_num_heads"],
            mlp_ratio=4,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_abs_pos=use_abs_pos,
            use_rel_pos=True,
            window_size=SMALL["window_size"],
            global_attn_indexes=SMALL["encoder_global_attn_indexes"],
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(SMALL["img_size"], SMALL["img_size"]),
            mask_in_chans=SMALL["mask_in_chans"],
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(
                depth=SMALL["decoder_depth"], embedding_dim=dim, mlp_dim=SMALL["decoder_mlp_dim"],
                num_heads=SMALL["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=SMALL["iou_head_hidden_dim"],
        ),
    )


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Every parameter and buffer random (zero-initialised rel_pos / pos_embed would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():  # not SAM's non-persistent pixel mean / std
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    m = _reference()
    ref = _reference_sam(m).eval()
    _randomise(ref)
    ours = SAMBoxSegmenter(**SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical key names and shapes
    return ref, ours


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g) * 255
    boxes = torch.tensor([[5.0, 7.0, 40.0, 50.0], [20.0, 3.0, 63.0, 33.0]])
    points = torch.tensor([[[10.0, 12.0], [30.0, 40.0]], [[50.0, 5.0], [2.0, 60.0]]])
    labels = torch.tensor([[1, 0], [0, 1]])
    masks = torch.randn(2, 1, 32, 32, generator=g)
    return images, boxes, points, labels, masks


def test_state_dict_keys_identical_to_reference(pair):
    ref, ours = pair
    assert list(ref.state_dict()) == list(ours.state_dict())


def test_image_embedding_matches_reference(pair):
    ref, ours = pair
    images = _inputs()[0]
    with torch.no_grad():
        x = ref.preprocess(images)  # SAM's normalisation (and padding, none at full size)
        expected = ref.image_encoder(x)
        got = ours.image_embeddings(images)
    assert got.shape == (2, 16, 8, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["boxes", "points", "points+boxes", "masks"])
def test_prompt_embeddings_match_reference(pair, kind):
    ref, ours = pair
    _, boxes, points, labels, masks = _inputs()
    kwargs = {
        "boxes": dict(points=None, boxes=boxes, masks=None),
        "points": dict(points=(points, labels), boxes=None, masks=None),
        "points+boxes": dict(points=(points, labels), boxes=boxes, masks=None),
        "masks": dict(points=None, boxes=None, masks=masks),
    }[kind]
    with torch.no_grad():
        s_ref, d_ref = ref.prompt_encoder(**kwargs)
        s, d = ours.prompt_encoder(**kwargs)
        pe_ref, pe = ref.prompt_encoder.get_dense_pe(), ours.prompt_encoder.get_dense_pe()
    assert s.shape == s_ref.shape and d.shape == d_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pe, pe_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multimask", [False, True])
def test_masks_and_iou_match_reference(pair, multimask):
    ref, ours = pair
    images, boxes, points, labels, _ = _inputs()
    with torch.no_grad():
        emb = ref.image_encoder(ref.preprocess(images))
        for i in range(2):  # reference protocol: one image embedding, its prompts batched
            for prompts in (dict(points=None, boxes=boxes[i : i + 1].repeat(3, 1), masks=None),
                            dict(points=(points[i : i + 1], labels[i : i + 1]), boxes=None, masks=None)):
                s, d = ref.prompt_encoder(**prompts)
                args = (emb[i : i + 1], ref.prompt_encoder.get_dense_pe(), s, d, multimask)
                m_ref, iou_ref = ref.mask_decoder(*args)
                m, iou = ours.mask_decoder(*args)
                assert m.shape == m_ref.shape == (s.shape[0], 3 if multimask else 1, 32, 32)
                torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(iou, iou_ref, rtol=1e-5, atol=1e-5)


def test_box_segmenter_forward_matches_reference_pipeline(pair):
    ref, ours = pair
    images, boxes, *_ = _inputs()
    with torch.no_grad():
        batched = [{"image": images[i], "original_size": (64, 64), "boxes": boxes[i : i + 1]} for i in range(2)]
        out = ref(batched, multimask_output=False)
        expected = torch.cat([o["low_res_logits"] for o in out])
        expected_full = torch.cat([ref.postprocess_masks(o["low_res_logits"], (64, 64), (64, 64)) for o in out])
        iou_ref = torch.cat([o["iou_predictions"] for o in out])
        emb = ours.image_embeddings(images)
        low, iou = ours.decode_with_iou(emb, boxes)
        full = ours(images, boxes)
    assert full.shape == (2, 1, 64, 64)
    torch.testing.assert_close(low, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(iou, iou_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, expected_full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.decode(emb, boxes, output_size=(64, 64)), full)
    low_model = SAMBoxSegmenter(mask_size=32, **SMALL).eval()
    low_model.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(low_model(images, boxes), expected, rtol=1e-5, atol=1e-4)


def test_sam_checkpoint_loads_and_strict_errors(pair, tmp_path):
    ref, _ = pair
    state = ref.state_dict()
    good = tmp_path / "sam_vit_small.pth"
    torch.save(state, good)
    model = load_sam_checkpoint(SAMBoxSegmenter(**SMALL), good)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(sam_box_segmenter(sam_checkpoint=good, **SMALL).mask_decoder.iou_token.weight,
                       state["mask_decoder.iou_token.weight"])

    missing = dict(state)
    del missing["mask_decoder.iou_token.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(InputDataError, match=r"missing\.pth: .*1 missing \(mask_decoder\.iou_token\.weight\)") as e:
        load_sam_checkpoint(SAMBoxSegmenter(**SMALL), tmp_path / "missing.pth")
    assert "\n" not in str(e.value)

    wrong = dict(state)
    wrong["image_encoder.neck.0.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(InputDataError, match=r"wrong\.pth: .*image_encoder\.neck\.0\.weight: file \[3, 3, 1, 1\]"):
        load_sam_checkpoint(SAMBoxSegmenter(**SMALL), tmp_path / "wrong.pth")

    with pytest.raises(InputDataError, match=r"absent\.pth: checkpoint file does not exist"):
        load_sam_checkpoint(SAMBoxSegmenter(**SMALL), tmp_path / "absent.pth")


def test_lvmmed_vit_encoder_mapping(tmp_path):
    """LVM-Med's file: bare encoder dict, no prefix, no pos_embed -> image encoder of a use_abs_pos=False model."""
    m = _reference()
    ref = _reference_sam(m, use_abs_pos=False).eval()
    _randomise(ref, seed=3)
    encoder_state = ref.image_encoder.state_dict()
    assert "pos_embed" not in encoder_state and not any(k.startswith("image_encoder.") for k in encoder_state)
    path = tmp_path / "lvmmed_vit.pth"
    torch.save(encoder_state, path)

    model = sam_box_segmenter(lvmmed_encoder=path, **SMALL).eval()
    assert model.image_encoder.pos_embed is None
    for k, v in encoder_state.items():
        assert torch.equal(model.state_dict()["image_encoder." + k], v), k
    images = _inputs()[0]
    with torch.no_grad():
        torch.testing.assert_close(model.image_embeddings(images), ref.image_encoder(ref.preprocess(images)),
                                   rtol=1e-5, atol=1e-5)
        # without absolute positions other sizes run: relative-position tables resized (40 px: grid 5)
        small = (images[:, :, :40, :40] - model.pixel_mean) / model.pixel_std
        torch.testing.assert_close(model.image_encoder(small), ref.image_encoder(small), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="40 px does not fit the absolute positions of a 64 px encoder"):
        SAMBoxSegmenter(**SMALL).image_encoder(small)

    # SAM file for prompt encoder / decoder, LVM-Med's for the encoder (SAM's pos_embed dropped)
    sam = _reference_sam(m).eval()
    _randomise(sam, seed=4)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    both = sam_box_segmenter(sam_checkpoint=tmp_path / "sam.pth", lvmmed_encoder=path, **SMALL)
    assert torch.equal(both.image_encoder.blocks[0].attn.rel_pos_h, encoder_state["blocks.0.attn.rel_pos_h"])
    assert torch.equal(both.mask_decoder.iou_token.weight, sam.state_dict()["mask_decoder.iou_token.weight"])

    with pytest.raises(InputDataError, match=r"lvmmed_vit\.pth: .*use_abs_pos=False"):
        load_lvmmed_vit_encoder(SAMBoxSegmenter(**SMALL), path)
    bad = dict(encoder_state)
    del bad["blocks.1.attn.rel_pos_w"]
    torch.save(bad, tmp_path / "bad_vit.pth")
    with pytest.raises(InputDataError, match=r"bad_vit\.pth: .*missing \(blocks\.1\.attn\.rel_pos_w\)"):
        load_lvmmed_vit_encoder(SAMBoxSegmenter(use_abs_pos=False, **SMALL), tmp_path / "bad_vit.pth")
    prefixed = {"image_encoder." + k: v for k, v in encoder_state.items()}
    torch.save(prefixed, tmp_path / "prefixed.pth")
    with pytest.raises(InputDataError, match=r"prefixed\.pth: .*unexpected \(image_encoder\."):
        load_lvmmed_vit_encoder(SAMBoxSegmenter(use_abs_pos=False, **SMALL), tmp_path / "prefixed.pth")


def test_vit_b_layout_is_the_official_one():
    """ViT-B defaults: keys and shapes of ``build_sam_vit_b`` (the ``sam_vit_b_01ec64.pth`` layout); meta device."""
    m = _reference()
    import segment_anything

    with torch.device("meta"):
        ref = segment_anything.build_sam_vit_b(checkpoint=None)
        model = SAMBoxSegmenter()
        lvmmed = SAMBoxSegmenter(use_abs_pos=False)
    assert isinstance(ref.image_encoder, m.ImageEncoderViT)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert set(lvmmed.state_dict()) == set(expected) - {"image_encoder.pos_embed"}
    sd = model.state_dict()
    assert sd["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert sd["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)  # window 14
    assert sd["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, 64)  # global, 64 x 64 grid
    assert sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape == (128, 256)
    assert [i for i, blk in enumerate(model.image_encoder.blocks) if blk.window_size == 0] == [2, 5, 8, 11]


def test_torchscript_forward_matches_eager(pair, tmp_path):
    """Export: ``torch.jit.script`` (what MONAI's ckpt_export uses) of forward(images, boxes), saved and reloaded."""
    _, ours = pair
    images, boxes, *_ = _inputs()
    scripted = torch.jit.script(ours)
    torch.jit.save(scripted, tmp_path / "sam.ts")
    loaded = torch.jit.load(tmp_path / "sam.ts")
    with torch.no_grad():
        out = loaded(images, boxes.flip(0))
        assert out.shape == (2, 1, 64, 64)
        torch.testing.assert_close(out, ours(images, boxes.flip(0)))
        torch.testing.assert_close(loaded(images[:1], boxes[:1]), ours(images[:1], boxes[:1]))


def test_frozen_encoders_and_cached_embeddings(pair):
    """Default: gradients reach the mask decoder only; decode on cached embeddings == forward."""
    ref, _ = pair
    model = SAMBoxSegmenter(**SMALL)
    model.load_state_dict(ref.state_dict())
    model.train()
    assert not model.image_encoder.training and not model.prompt_encoder.training and model.mask_decoder.training
    images, boxes, *_ = _inputs()
    model(images, boxes).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # single-mask output: the IoU head is outside the graph of the loss; the 3 multimask
    # hypernetworks are inside it (all four masks are computed, then sliced) with zero gradient
    with_grad = {n for n, g in grads.items() if g is not None}
    assert with_grad == {n for n in grads if n.startswith("mask_decoder.") and ".iou_prediction_head." not in n}
    multimask = [g for n, g in grads.items() if n.startswith(("mask_decoder.output_hypernetworks_mlps.1.",
                                                              "mask_decoder.output_hypernetworks_mlps.3."))]
    assert multimask and all(torch.count_nonzero(g) == 0 for g in multimask)
    assert torch.count_nonzero(grads["mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"]) > 0
    with torch.no_grad():
        cached = model.image_embeddings(images)
        torch.testing.assert_close(model.decode(cached, boxes, output_size=[64, 64]), model(images, boxes))
    tuned = SAMBoxSegmenter(train_image_encoder=True, **SMALL)
    tuned.train()
    assert tuned.image_encoder.training
    tuned(images, boxes).sum().backward()
    assert tuned.image_encoder.patch_embed.proj.weight.grad is not None
    assert tuned.prompt_encoder.point_embeddings[2].weight.grad is None


def test_torchvision_stand_in_does_not_outlive_the_import():
    _reference()
    tv = sys.modules.get("torchvision")
    assert tv is None or tv.__spec__ is not None  # absent, or the real package
