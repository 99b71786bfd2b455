"""Bad input to the core (images, layers, hooks, processors, metrics, notebooks' helpers, loaders): every case is a
clear error of the right type whose message says what is wrong (the phrase asserted), or a warning where the input
is legal but almost surely a mistake. Paper modules keep their own tables next to their tests."""
import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image

from diffnb.hooks import CrossAttentionStore, FeatureCache, capture, token_index
from diffnb.images import from_tensor_image, to_tensor_image, to_uint8
from diffnb.layers import select, select_many
from diffnb.metrics import iou, paired_bootstrap, psnr
from diffnb.models import load_pipeline, tiny_pipeline
from diffnb.nb import claim, generator
from diffnb.processors import TokenReweight, attention_names, patch_attention, track_steps
from diffnb.viz import browse, image_grid, overlay, pca_rgb

U8 = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
NAMES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1", "up_blocks.1.attentions.0.transformer_blocks.0.attn2"]


@lru_cache(maxsize=1)
def _pipe():
    return tiny_pipeline("sd15")


def _run(pipe, steps=3):
    pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")


def _quiet(fn):
    """Run fn with warnings silenced (cases whose error comes after a warning that has its own case)."""
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    return run


def _capture_then_get(steps, get_step=None):
    p = _pipe()
    with capture(p, "up_blocks.0.resnets.0", steps=steps) as cache:
        _run(p)
    return cache.get("up_blocks.0.resnets.0", get_step)


def _capture_nothing_run():
    with capture(_pipe(), "up_blocks.0.resnets.0") as cache:
        pass
    return cache.get("up_blocks.0.resnets.0")


def _mean_stack():
    p = _pipe()
    with capture(p, "up_blocks.0.resnets.0", aggregate="mean") as cache:
        _run(p, 2)
    return cache.stack("up_blocks.0.resnets.0")


def _store_maps(pattern="cross", **kw):
    p = _pipe()
    store = CrossAttentionStore(**kw)
    with patch_attention(p.unet, {pattern: store}):
        _run(p, 2)
    return store


def _tour_without_notebooks(tmp):
    from diffnb import tour

    return tour.main(["--notebooks", str(tmp)])


P = pytest.param
CASES = [
    # --- images: the range comes from the type (and value_range), never from the values -------------------------
    P(lambda: to_tensor_image(torch.rand(3, 8, 8) * 255), ValueError, "outside the range [-1, 1]", id="tensor-0..255"),
    P(lambda: to_tensor_image(U8.astype(np.float32)), ValueError, "pass a uint8 image", id="numpy-float-0..255"),
    P(lambda: to_uint8(-np.ones((4, 4, 3))), ValueError, "value_range=(-1, 1)", id="numpy-float-negative"),
    P(lambda: to_tensor_image(torch.rand(3, 8, 8), value_range=(0, 0.5)), ValueError, "outside the range [0, 0.5]",
      id="tensor-outside-stated-range"),
    P(lambda: to_tensor_image(U8[..., 0]), ValueError, "grayscale", id="numpy-grayscale-2d"),
    P(lambda: to_tensor_image(U8[..., :1]), ValueError, "grayscale", id="numpy-grayscale-1ch"),
    P(lambda: to_tensor_image(np.concatenate([U8, U8[..., :1]], -1)), ValueError, "3 (RGB) channels", id="numpy-rgba"),
    P(lambda: to_uint8(U8.transpose(2, 0, 1)), ValueError, "channels-first", id="numpy-chw"),
    P(lambda: to_tensor_image(torch.from_numpy(U8)), ValueError, "channels-last", id="tensor-hwc"),
    P(lambda: to_tensor_image(torch.zeros(1, 4, 8, 8)), ValueError, "3 (RGB) channels", id="tensor-4ch-latent"),
    P(lambda: to_tensor_image(torch.zeros(8, 8)), ValueError, "grayscale", id="tensor-grayscale"),
    P(lambda: to_tensor_image(U8[..., :2], grayscale=True), ValueError, "3 (RGB) channels", id="grayscale-2ch"),
    P(lambda: to_tensor_image(np.concatenate([U8, U8[..., :1]], -1)), ValueError, "drop an alpha channel",
      id="numpy-rgba-hint"),
    P(lambda: to_tensor_image(Image.fromarray(U8).convert("RGBA")), ValueError, "mode 'RGBA'", id="pil-rgba"),
    P(lambda: to_uint8(Image.fromarray(U8).convert("P")), ValueError, "mode 'P'", id="pil-palette"),
    P(lambda: to_tensor_image(U8.astype(np.int32)), TypeError, "uint8 (0..255) or float", id="numpy-int32"),
    P(lambda: to_tensor_image(torch.zeros(3, 8, 8, dtype=torch.bool)), TypeError, "got dtype torch.bool",
      id="tensor-bool"),
    P(lambda: to_tensor_image("cat.png"), TypeError, "PIL image, a numpy array or a torch tensor", id="path-string"),
    P(lambda: to_tensor_image([]), ValueError, "empty list", id="empty-list"),
    P(lambda: to_tensor_image([U8, U8[:4]]), ValueError, "same size", id="list-mixed-sizes"),
    P(lambda: to_tensor_image(U8, value_range=(0, 1)), ValueError, "does not apply", id="uint8-with-range"),
    P(lambda: to_tensor_image(np.full((4, 4, 3), np.nan)), ValueError, "NaN", id="numpy-nan"),
    P(lambda: to_tensor_image(torch.zeros(3, 4, 4), value_range=(1, 0)), ValueError, "low < high", id="range-reversed"),
    P(lambda: to_tensor_image(torch.zeros(3, 4, 4), value_range="01"), TypeError, "a pair (low, high)",
      id="range-string"),
    P(lambda: to_tensor_image(U8, size=0), ValueError, "size must be a positive int", id="size-zero"),
    P(lambda: from_tensor_image(U8), TypeError, "use to_uint8", id="from-tensor-numpy"),
    P(lambda: from_tensor_image(torch.zeros(1, 3, 4, 4, dtype=torch.int64)), TypeError, "float tensors in [-1, 1] or uint8",
      id="from-tensor-int64"),
    # --- layer patterns ----------------------------------------------------------------------------------------
    P(lambda: select(NAMES, ""), ValueError, "empty layer pattern", id="pattern-empty"),
    P(lambda: select(NAMES, "=up_blocks.1.attentions.0.transformer_blocks.0.attn9"), ValueError, "no layer is named",
      id="pattern-exact-missing"),
    P(lambda: select(NAMES, "re:up_blocks.(1"), ValueError, "bad regular expression", id="pattern-bad-regex"),
    P(lambda: select(NAMES, "cross@big"), ValueError, "bad resolution filter", id="pattern-bad-resolution"),
    P(lambda: select(NAMES, "cross@16"), ValueError, "needs the UNet", id="pattern-resolution-no-unet"),
    P(lambda: select(NAMES, "mid.*"), ValueError, "matches nothing", id="pattern-matches-nothing"),
    P(lambda: select(NAMES, 3), TypeError, "must be a str", id="pattern-int"),
    P(lambda: select_many(NAMES, []), ValueError, "no layer patterns", id="patterns-empty-list"),
    P(lambda: select_many(NAMES, 42), TypeError, "a str or a list of str", id="patterns-int"),
    # --- capture / FeatureCache --------------------------------------------------------------------------------
    P(_quiet(lambda: _capture_then_get([50])), KeyError, "none of the requested steps [50] ran",
      id="capture-steps-beyond-run"),
    P(lambda: _capture_then_get([0, 2], get_step=1), KeyError, "captured steps: [0, 2]", id="get-step-not-captured"),
    P(_capture_nothing_run, KeyError, "never ran inside `capture`", id="capture-nothing-ran"),
    P(lambda: _pipe_cache_missing_layer(), KeyError, "was not captured",
      id="get-unknown-layer"),
    P(lambda: capture(_pipe(), "up.*", steps=[]).__enter__(), ValueError, "steps is empty", id="capture-steps-empty"),
    P(lambda: capture(_pipe(), "up.*", steps=[981.0]).__enter__(), TypeError, "not step indices",
      id="capture-steps-float"),
    P(lambda: capture(_pipe(), "up.*", steps=[-1]).__enter__(), ValueError, "counted from 0", id="capture-steps-negative"),
    P(lambda: capture(_pipe(), "up.*", steps="0").__enter__(), TypeError, "steps must be None, an int or a list",
      id="capture-steps-string"),
    P(lambda: capture(_pipe(), "up.*", offload="gpu0").__enter__(), ValueError, "offload must be a device",
      id="capture-bad-offload"),
    P(lambda: capture("unet", "up.*").__enter__(), TypeError, "pipeline with .unet", id="capture-not-a-model"),
    P(_mean_stack, ValueError, "use get(layer)", id="stack-of-mean"),
    P(lambda: FeatureCache("sum"), ValueError, "aggregate must be None or 'mean'", id="cache-bad-aggregate"),
    # --- cross-attention store ---------------------------------------------------------------------------------
    P(lambda: _store_maps(resolutions={99}).maps(), RuntimeError, "matches none of the cross-attention resolutions",
      id="store-resolution-absent"),
    P(lambda: _store_maps("self").maps(), RuntimeError, "self-attention layers only", id="store-on-self-attention"),
    P(lambda: CrossAttentionStore().maps(), RuntimeError, "never ran", id="store-never-ran"),
    P(lambda: _store_maps().maps(resolution=99), ValueError, "no maps at resolution 99", id="store-maps-bad-resolution"),
    P(lambda: _store_maps().maps(size=(64, 64)), ValueError, "size must be a positive int", id="store-maps-size-tuple"),
    P(lambda: CrossAttentionStore(resolutions="16"), ValueError, "feature-map sides", id="store-resolutions-string"),
    P(lambda: CrossAttentionStore(steps=[1]), ValueError, "needs a RunState", id="store-steps-without-state"),
    P(lambda: CrossAttentionStore(16), TypeError, "are keywords", id="store-positional-resolution"),
    P(lambda: token_index(_pipe().tokenizer, "a cat", "dog"), ValueError, "is not in the prompt", id="token-not-in-prompt"),
    # --- processors --------------------------------------------------------------------------------------------
    P(lambda: patch_attention(_pipe().unet, {}).__enter__(), TypeError, "non-empty dict", id="patch-empty-dict"),
    P(lambda: patch_attention(_pipe().unet, {"cross": CrossAttentionStore}).__enter__(), TypeError, "not an instance",
      id="patch-processor-class"),
    P(lambda: patch_attention(_pipe().unet, {"cross": 3}).__enter__(), TypeError, "not callable",
      id="patch-not-callable"),
    P(lambda: patch_attention(_pipe(), {"cross": TokenReweight({1: 2.0})}).__enter__(), TypeError, "pass pipe.unet",
      id="patch-pipeline"),
    P(lambda: patch_attention(_pipe().unet, {("up", "down"): TokenReweight({1: 2.0})}).__enter__(), TypeError,
      "must be a str", id="patch-tuple-pattern"),
    P(lambda: capture(_pipe(), None).__enter__(), TypeError, "a str or a list of str", id="capture-no-patterns"),
    P(lambda: TokenReweight({"cat": 2.0}), TypeError, "token positions", id="reweight-word-key"),
    P(lambda: TokenReweight({1: "x"}), TypeError, "finite number", id="reweight-bad-weight"),
    P(lambda: TokenReweight({}), ValueError, "non-empty dict", id="reweight-empty"),
    P(lambda: track_steps(_pipe().unet, None).__enter__(), TypeError, "needs a RunState", id="track-steps-no-state"),
    P(lambda: attention_names(_pipe()), TypeError, "pass pipe.unet", id="attention-names-of-pipeline"),
    # --- loaders, inversion ------------------------------------------------------------------------------------
    P(lambda: load_pipeline("nope"), ValueError, "unknown model", id="load-unknown-model"),
    P(lambda: load_pipeline("clip"), ValueError, "image encoder, not a pipeline", id="load-encoder"),
    P(lambda: load_pipeline("toy", dtype="float8"), ValueError, "unknown dtype", id="load-bad-dtype-name"),
    P(lambda: load_pipeline("toy", dtype=torch.int8), TypeError, "dtype must be one of", id="load-int-dtype"),
    P(lambda: load_pipeline("toy", device="cpu", dtype=torch.float16), ValueError, "float16 does not run on the CPU",
      id="load-fp16-cpu"),
    P(lambda: load_pipeline("toy", device=0.5), TypeError, "device must be a str", id="load-bad-device"),
    P(lambda: __import__("diffnb.inversion").inversion.ddim_invert(_pipe(), U8, num_inference_steps=0), ValueError,
      "num_inference_steps must be a positive int", id="ddim-invert-zero-steps"),
    # --- metrics, notebook helpers, figures --------------------------------------------------------------------
    P(lambda: psnr(U8, U8[:4]), ValueError, "shapes differ", id="psnr-shapes"),
    P(lambda: psnr(U8 / 255.0, U8 / 255.0), ValueError, "needs data_range", id="psnr-float-no-range"),
    P(lambda: iou(np.random.default_rng(0).random((4, 4)), np.ones((4, 4))), ValueError, "must be binary",
      id="iou-soft-mask"),
    P(lambda: paired_bootstrap([1, 2, 3], [1, 2]), ValueError, "equal-length", id="bootstrap-lengths"),
    P(lambda: paired_bootstrap([1, np.nan], [1, 2]), ValueError, "NaN", id="bootstrap-nan"),
    P(lambda: claim("00", "x", 1.0, met="yes"), TypeError, "met must be True, False or None", id="claim-met-string"),
    P(lambda: claim("00", "x", "high"), TypeError, "must be numbers", id="claim-value-string"),
    P(lambda: generator(1.5), TypeError, "a seed must be an int", id="generator-float-seed"),
    P(lambda: browse({"a": U8}), ValueError, "(a, b) pairs", id="browse-flat-keys"),
    P(lambda: pca_rgb(torch.randn(4, 4)), ValueError, "(C, H, W)", id="pca-2d"),
    P(lambda: pca_rgb(torch.randn(4, 4, 4), n_components=5), ValueError, "n_components", id="pca-too-many"),
    P(lambda: overlay(U8, np.zeros((2, 4, 4))), ValueError, "2-D map", id="overlay-3d-heat"),
    P(lambda: image_grid([]), ValueError, "at least one image", id="grid-empty"),
]


def _pipe_cache_missing_layer():
    p = _pipe()
    with capture(p, "up_blocks.0.resnets.0") as cache:
        _run(p, 1)
    return cache.get("up_blocks.0.resnets.1")


@pytest.mark.parametrize("call, error, phrase", CASES)
def test_bad_input_is_a_clear_error(call, error, phrase):
    with pytest.raises(error) as info:
        call()
    message = str(info.value.args[0]) if isinstance(info.value, KeyError) else str(info.value)
    assert phrase in message, f"{error.__name__} message {message!r} lacks {phrase!r}"


WARNINGS = [
    P(lambda: to_tensor_image(torch.rand(3, 8, 8)), "pass value_range=(0, 1)", id="tensor-[0,1]-read-as-[-1,1]"),
    P(lambda: _capture_then_get([2, 50], get_step=2), "steps [50] never ran", id="capture-some-steps-never-ran"),
]


@pytest.mark.parametrize("call, phrase", WARNINGS)
def test_suspicious_input_warns(call, phrase):
    with pytest.warns(UserWarning, match=None) as record:
        call()
    assert any(phrase in str(w.message) for w in record), [str(w.message) for w in record]


def test_explicit_range_silences_the_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.rand(3, 8, 8)
        assert torch.equal(to_tensor_image(x, value_range=(-1, 1))[0], x)
        torch.testing.assert_close(to_tensor_image(x, value_range=(0, 1))[0], x * 2 - 1)


def test_views_and_read_only_arrays_convert():
    """A flipped view (negative strides) and a read-only array (np.asarray of a PIL image) are fine inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flipped = to_tensor_image(U8[:, ::-1])
        assert torch.equal(flipped, to_tensor_image(U8).flip(-1))
        assert torch.equal(to_tensor_image(np.asarray(Image.fromarray(U8))), to_tensor_image(U8))
        assert torch.equal(to_tensor_image(U8[:, ::-1] / 255.0), flipped)


def test_tour_without_notebooks_says_what_it_needs(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as info:
        _tour_without_notebooks(tmp_path)
    assert info.value.code == 2
    assert "no notebooks" in capsys.readouterr().err
    # as from a non-editable install: no notebooks/ beside the package, none in the working directory
    from diffnb import tour

    monkeypatch.setattr(tour, "ROOT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIFFNB_NOTEBOOKS", raising=False)
    with pytest.raises(SystemExit) as info:
        tour.main([])
    assert info.value.code == 2 and "--notebooks DIR" in capsys.readouterr().err
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_x.ipynb").write_text("{}")
    assert tour.find_notebooks() == (tmp_path / "notebooks").resolve()  # ./notebooks of a clone is found


def test_table_has_at_least_30_cases():
    assert len(CASES) >= 30
