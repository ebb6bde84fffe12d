"""`dconnx explain` and its pictures: the model's own normalization and class names recorded by
convert, one colorbar per map, one colormap kind per method, the explain options and warnings,
and `Explainer.maps` returning logits and the explained class."""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import dconnx
from dconnx.cli import main
from dconnx.errors import OptionError
from dconnx.images import explain_image
from dconnx.runtime import Explainer
from dconnx.viz import COLORMAPS, IMAGENET_MEAN, IMAGENET_STD, MapStyle, PictureWarning, layout, panel

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixture_cnn.onnx"
SIDECAR = json.loads(FIXTURE.with_suffix(".json").read_text())
IMAGE = ROOT / "docs" / "images" / "example.png"
METHODS = ("splitgrad", "splitcam", "gradcam")
SIZE = (64, 64)


@pytest.fixture(scope="module")
def fixture_dc(tmp_path_factory) -> Path:
    """The fixture converted without --mean/--std: convert reads models/fixture_cnn.json."""
    out = tmp_path_factory.mktemp("pictures") / "fixture.dc.onnx"
    dconnx.convert(str(FIXTURE), str(out), methods=",".join(METHODS), layer=10)
    return out


@pytest.fixture(scope="module")
def bare_dc(tmp_path_factory) -> Path:
    """The same network copied to a folder without its json: nothing to record."""
    d = tmp_path_factory.mktemp("bare")
    shutil.copy(FIXTURE, d / "net.onnx")
    out = d / "net.dc.onnx"
    dconnx.convert(str(d / "net.onnx"), str(out), methods=",".join(METHODS), layer=10)
    return out


def meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def normalized(path, mean, std) -> np.ndarray:
    """The model input of an image file, computed here: bilinear resize, [0, 1], (x − mean) / std."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB").resize(SIZE[::-1], Image.BILINEAR), np.float32) / 255
    x = np.moveaxis(rgb, -1, 0)
    return ((x - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]).astype(np.float32)


def explain_cli(model, out, *extra, image=IMAGE):
    return main(["explain", str(model), str(image), "-o", str(out), *extra])


def fed_inputs(monkeypatch) -> list:
    """Records every input Explainer.maps is given."""
    seen, original = [], Explainer.maps

    def spy(self, x, *args, **kwargs):
        seen.append(np.array(x))
        return original(self, x, *args, **kwargs)
    monkeypatch.setattr(Explainer, "maps", spy)
    return seen


# -- 1. the model's own normalization ----------------------------------------
def test_convert_records_the_sidecar_normalization_and_class_names(fixture_dc):
    m = meta(fixture_dc)
    pre = json.loads(m["dconnx.preprocess"])
    assert pre["mean"] == SIDECAR["normalization"]["mean"]
    assert pre["std"] == SIDECAR["normalization"]["std"]
    assert json.loads(m["dconnx.class_names"]) == SIDECAR["class_names"]


def test_given_mean_std_win_over_the_sidecar(tmp_path):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    out = tmp_path / "given.dc.onnx"
    dconnx.convert(str(FIXTURE), str(out), methods="splitgrad", layer=10, mean=mean, std=std)
    pre = json.loads(meta(out)["dconnx.preprocess"])
    assert pre["mean"] == list(mean) and pre["std"] == list(std)


def test_explain_feeds_the_recorded_normalization(fixture_dc, tmp_path, monkeypatch, capsys):
    seen = fed_inputs(monkeypatch)
    assert explain_cli(fixture_dc, tmp_path / "heat.png") == 0
    want = normalized(IMAGE, SIDECAR["normalization"]["mean"], SIDECAR["normalization"]["std"])
    np.testing.assert_allclose(seen[0][0], want, rtol=1e-6, atol=1e-6)
    imagenet = normalized(IMAGE, IMAGENET_MEAN, IMAGENET_STD)
    assert np.abs(seen[0][0] - imagenet).max() > 0.05          # the two normalizations differ here
    # the .npy maps are the maps of that input
    ref = Explainer(fixture_dc).maps(want[None])
    for m in METHODS:
        np.testing.assert_allclose(np.load(tmp_path / f"heat.{m}.npy"), ref[m][0], rtol=1e-5, atol=1e-7)
    assert "ImageNet" not in capsys.readouterr().err


def test_explain_mean_std_options_come_first(fixture_dc, tmp_path, monkeypatch):
    seen = fed_inputs(monkeypatch)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.2, 0.3)
    assert explain_cli(fixture_dc, tmp_path / "heat.png", "--mean", ",".join(map(str, mean)),
                       "--std", ",".join(map(str, std))) == 0
    np.testing.assert_allclose(seen[0][0], normalized(IMAGE, mean, std), rtol=1e-6, atol=1e-6)


def test_explain_warns_when_it_falls_back_to_imagenet(bare_dc, tmp_path, monkeypatch, capsys):
    assert json.loads(meta(bare_dc)["dconnx.preprocess"]) == {"mean": None, "std": None}
    seen = fed_inputs(monkeypatch)
    assert explain_cli(bare_dc, tmp_path / "heat.png") == 0
    err = capsys.readouterr().err
    assert "dconnx: warning:" in err and "ImageNet" in err and "--mean/--std" in err
    np.testing.assert_allclose(seen[0][0], normalized(IMAGE, IMAGENET_MEAN, IMAGENET_STD), rtol=1e-6, atol=1e-6)


# -- 2. pictures --------------------------------------------------------------
@pytest.mark.parametrize("method, kind", [("splitgrad", "diverging"), ("gradient", "diverging"),
                                          ("splitlrp", "diverging"), ("splitcam", "sequential"),
                                          ("gradcam", "sequential"), ("layercam", "sequential")])
def test_colormap_is_chosen_by_the_method_not_the_data(method, kind):
    rng = np.random.default_rng(0)
    positive = rng.random((16, 16)) + 0.1
    negative = -rng.random((16, 16)) - 0.1
    a, b = MapStyle.of(method, positive), MapStyle.of(method, negative)
    assert a.cmap == b.cmap and COLORMAPS[a.cmap].kind == kind
    if kind == "diverging":       # centred at 0, symmetric
        for s, m in ((a, positive), (b, negative)):
            assert s.vmin == -s.vmax == -np.abs(m).max()
    else:
        assert a.vmin == 0 and a.vmax == positive.max()
    # the drawn colorbars are the same pixels
    image = np.full((16, 16, 3), 0.5)
    bars = []
    for heat in (positive, negative):
        arr = panel(image, {method: heat})
        bar = layout((16, 16), [MapStyle.of(method, heat)]).tiles[1].colorbar
        bars.append(arr[bar.y:bar.y + bar.h, bar.x:bar.x + bar.w])
    assert np.array_equal(bars[0], bars[1])
    top = (COLORMAPS[a.cmap](1.0) * 255).round()
    assert np.array_equal(bars[0][0, 0], top)


def test_every_map_has_its_own_colorbar_and_nothing_overlaps():
    rng = np.random.default_rng(1)
    maps = {"splitgrad": rng.standard_normal((64, 64)) * 1e-3, "splitcam": rng.random((64, 64)) * 40,
            "gradcam": rng.random((64, 64))}
    styles = [MapStyle.of(k, v) for k, v in maps.items()]
    lay = layout((64, 64), styles, "a title of reasonable length: class 2 'checker', logit 2.62")
    tiles = [t for t in lay.tiles if t.name != "input"]
    assert [t.name for t in tiles] == list(maps)
    for t, (name, heat) in zip(tiles, maps.items()):
        assert t.colorbar is not None and len(t.ticks) == 3
        values = [v for v, _, _ in t.ticks]
        assert values[0] == t.style.vmax == max(heat.max(), abs(heat.min()) if t.style.signed else 0)
        assert values[-1] == t.style.vmin
    boxes = lay.boxes()
    for i, (a, box_a) in enumerate(boxes):
        assert 0 <= box_a.x and box_a.x + box_a.w <= lay.width and 0 <= box_a.y and box_a.y + box_a.h <= lay.height, a
        for b, box_b in boxes[i + 1:]:
            assert not box_a.overlaps(box_b), (a, b)
    arr = panel(np.full((64, 64, 3), 0.5), maps, lay.title)
    assert arr.shape == (lay.height, lay.width, 3)


def test_constant_map_warns_naming_the_method():
    with pytest.warns(PictureWarning, match="splitgrad map is constant"):
        panel(np.full((8, 8, 3), 0.5), {"splitgrad": np.zeros((8, 8)), "splitcam": np.eye(8)})


def colorbar_found(arr: np.ndarray, cmap: str, height: int) -> bool:
    """A vertical strip of the PNG equal to the colormap from its top (1) to its bottom (0)."""
    want = (COLORMAPS[cmap](np.linspace(1.0, 0.0, height)) * 255).round().astype(np.uint8)
    for y, x in np.argwhere(np.all(arr == want[0], axis=-1)):
        if y + height <= arr.shape[0] and np.array_equal(arr[y:y + height, x], want):
            return True
    return False


def test_explain_options_methods_cmap_overlay(fixture_dc, tmp_path, capsys):
    default = tmp_path / "default.png"
    assert explain_cli(fixture_dc, default) == 0
    arr = np.asarray(Image.open(default).convert("RGB"))
    bar_h = layout(SIZE, [MapStyle.of("splitgrad", np.eye(SIZE[0]))]).tiles[1].picture.h
    assert colorbar_found(arr, "bwr", bar_h) and colorbar_found(arr, "hot", bar_h)
    assert not colorbar_found(arr, "viridis", bar_h)

    one = tmp_path / "one.png"
    assert explain_cli(fixture_dc, one, "--methods", "gradcam", "--cmap", "viridis") == 0
    assert (tmp_path / "one.npy").exists() and not list(tmp_path.glob("one.*.npy"))
    arr = np.asarray(Image.open(one).convert("RGB"))
    assert colorbar_found(arr, "viridis", bar_h) and not colorbar_found(arr, "hot", bar_h)
    assert "with gradcam on" in capsys.readouterr().out

    # overlay 0: every map tile is the same (grayed) picture; 1: the maps show
    heats = {m: np.load(tmp_path / f"default.{m}.npy") for m in METHODS}
    tiles = layout(SIZE, [MapStyle.of(m, h) for m, h in heats.items()], "t").tiles[1:]
    pictures = {}
    for strength in ("0", "1"):
        out = tmp_path / f"overlay{strength}.png"
        assert explain_cli(fixture_dc, out, "--overlay", strength) == 0
        a = np.asarray(Image.open(out).convert("RGB"))
        pictures[strength] = [a[t.picture.y:t.picture.y + t.picture.h, t.picture.x:t.picture.x + t.picture.w]
                              for t in tiles]
    assert all(np.array_equal(p, pictures["0"][0]) for p in pictures["0"])
    assert not np.array_equal(pictures["1"][0], pictures["1"][1])

    capsys.readouterr()
    assert explain_cli(fixture_dc, tmp_path / "x.png", "--methods", "splitgrad,nope") == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "available: splitgrad, splitcam, gradcam" in err
    assert explain_cli(fixture_dc, tmp_path / "x.png", "--cmap", "rainbow") == 2
    assert "available: " + ", ".join(COLORMAPS) in capsys.readouterr().err
    assert explain_cli(fixture_dc, tmp_path / "x.png", "--overlay", "1.5") == 2
    assert "outside [0, 1]" in capsys.readouterr().err


def test_explain_warns_on_a_distorting_resize(fixture_dc, tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.open(IMAGE).resize((SIZE[1] * 3 // 2, SIZE[0])).save(wide)
    assert explain_cli(fixture_dc, tmp_path / "w.png", image=wide) == 0
    err = capsys.readouterr().err
    assert "dconnx: warning:" in err and "aspect 1.50" in err and "64x64" in err
    square = tmp_path / "square.png"
    Image.open(IMAGE).resize((SIZE[1] * 2, SIZE[0] * 2)).save(square)
    assert explain_cli(fixture_dc, tmp_path / "s.png", image=square) == 0
    assert "aspect" not in capsys.readouterr().err


def test_title_names_the_class_not_the_provider(fixture_dc, bare_dc, tmp_path, capsys):
    ex = Explainer(fixture_dc)
    done = explain_image(ex, IMAGE, tmp_path / "a.png", target=1)
    assert done.class_name == SIDECAR["class_names"][1] and repr(done.class_name) in done.title
    assert "ExecutionProvider" not in done.title and ex.provider not in done.title
    # a labels file: one name per line, or a JSON list
    names = [f"kind {i}" for i in range(len(SIDECAR["class_names"]))]
    norm = {k: SIDECAR["normalization"][k] for k in ("mean", "std")}
    bare = Explainer(bare_dc)
    lines, listed = tmp_path / "labels.txt", tmp_path / "labels.json"
    lines.write_text("\n".join(names) + "\n")
    listed.write_text(json.dumps(names))
    for labels in (lines, listed):
        done = explain_image(bare, IMAGE, tmp_path / "b.png", target=2, labels=labels, **norm)
        assert done.class_name == names[2] and repr(names[2]) in done.title
    assert explain_cli(bare_dc, tmp_path / "c.png", "--labels", str(lines), "--target", "3") == 0
    out = capsys.readouterr().out
    assert f"explained class 3 ({names[3]})" in out and bare.provider in out
    # no names known: the number only
    done = explain_image(bare, IMAGE, tmp_path / "d.png", target=0, **norm)
    assert done.class_name is None and "class 0," in done.title
    lines.write_text("one\ntwo\n")
    with pytest.raises(OptionError, match="names 2 classes; the model has 4"):
        explain_image(bare, IMAGE, tmp_path / "e.png", labels=lines, **norm)


# -- 3. Explainer.maps: logits and the explained class -------------------------
def test_maps_return_logits_and_target(fixture_dc):
    from dconnx.eval.synthetic import make_dataset
    x, _, _ = make_dataset(5, size=SIZE[0], n_classes=4, seed=3, clutter=True)
    session = ort.InferenceSession(str(FIXTURE), providers=["CPUExecutionProvider"])
    plain = session.run(None, {session.get_inputs()[0].name: x})[0]
    ex = Explainer(fixture_dc)
    maps = ex.maps(x)
    assert isinstance(maps, dict) and list(maps) == list(METHODS)
    np.testing.assert_allclose(maps.logits, plain, rtol=1e-5, atol=1e-5)
    assert maps.target.dtype == np.int64 and np.array_equal(maps.target, plain.argmax(1))
    given = (plain.argmax(1) + 1) % 4
    assert np.array_equal(ex.maps(x, target=given).target, given)
    assert np.array_equal(ex.maps(x, target=2).target, np.full(5, 2))
    mixed = np.array([-1, 0, -1, 3, 1])
    assert np.array_equal(ex.maps(x, target=mixed).target, np.where(mixed < 0, plain.argmax(1), mixed))
    one = ex.maps(x[0])
    assert one.target.shape == (1,) and one.target[0] == plain[0].argmax()
