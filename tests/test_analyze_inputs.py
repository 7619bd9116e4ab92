"""`python -m i2am analyze` checks its photos and masks before it loads a model (which can
take minutes), and says which of the given flags the chosen source ignores."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.analyze_data import photos


class ModelLoaded(AssertionError):
    pass


@pytest.fixture
def pics(tmp_path_factory) -> dict[str, Path]:
    return photos(tmp_path_factory.getbasetemp())


@pytest.fixture
def no_model(monkeypatch) -> list[dict]:
    """open_source replaced: records its arguments and stops the run there."""
    import apps.analyze

    calls: list[dict] = []

    def fake_open_source(path, **kwargs):
        calls.append({"path": str(path), **kwargs})
        raise ModelLoaded("the model would be loaded now")

    monkeypatch.setattr(apps.analyze, "open_source", fake_open_source)
    return calls


def _run(args: list[str], capsys) -> tuple[int | None, str, str]:
    from apps.cli import main

    try:
        rc = main(["analyze", *args])
    except ModelLoaded:
        rc = None
    out = capsys.readouterr()
    return rc, out.out, out.err


def _base(pics, tmp_path, **change: str) -> list[str]:
    given = {"--person": str(pics["person"]), "--mask": str(pics["person_mask"]),
             "--garment": str(pics["garment_grey"]), "--out": str(tmp_path / "out")}
    given.update(change)
    return [str(tmp_path / "run"), *[x for kv in given.items() for x in kv]]


def test_good_inputs_reach_the_model(pics, tmp_path, no_model, capsys):
    """The control: with good photos the run gets as far as loading the model."""
    rc, _, err = _run(_base(pics, tmp_path), capsys)
    assert rc is None and len(no_model) == 1, err


def test_bad_photos_and_masks_are_reported_before_the_model_loads(pics, tmp_path, no_model, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    black = tmp_path / "black_mask.png"
    Image.new("L", Image.open(pics["person_mask"]).size, 0).save(black)
    small_gmask = tmp_path / "gmask.png"
    Image.new("L", (10, 10), 255).save(small_gmask)
    cases = [
        ({"--mask": str(pics["coffee_mask"])}, ["--mask", "same size", "400x600", "512x384"]),
        ({"--person": str(text)}, ["--person", "cannot read", "notes.png"]),
        ({"--garment": str(text)}, ["--garment", "cannot read"]),
        ({"--mask": str(text)}, ["--mask", "cannot read"]),
        ({"--mask": str(black)}, ["--mask", "no white pixel"]),
        ({"--garment-mask": str(small_gmask)}, ["--garment-mask", "10x10", "garment photo", "512x512"]),
        ({"--garment-mask": str(text)}, ["--garment-mask", "cannot read"]),
    ]
    for change, words in cases:
        rc, _, err = _run(_base(pics, tmp_path, **change), capsys)
        assert rc == 2, (change, err)
        for w in words:
            assert w in err, (change, w, err)
    assert no_model == []  # no case got as far as the model
    assert not (tmp_path / "out").exists()
    # an agnostic image is checked the same way
    args = _base(pics, tmp_path, **{"--mask": str(pics["person_mask"])})
    args[args.index("--person")] = "--agnostic"
    args[args.index("--agnostic") + 1] = str(pics["chelsea_grey"])
    rc, _, err = _run(args, capsys)
    assert rc == 2 and "agnostic" in err and "same size" in err and no_model == []


def _pipeline_dir(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / kind
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": kind}))
    return d


def test_ignored_flags_are_named(pics, tmp_path, no_model, capsys):
    # Paint-by-Example: no text prompt; no saved config for --set
    pbe = _pipeline_dir(tmp_path, "PaintByExamplePipeline")
    args = _base(pics, tmp_path)
    args[0] = str(pbe)
    rc, _, err = _run([*args, "--prompt", "a red shirt", "--set", "diffusion.sample_steps=3"], capsys)
    assert rc is None
    assert "warning: --prompt is ignored" in err and "Paint-by-Example" in err
    assert "warning: --set is ignored" in err
    assert no_model[-1]["overrides"] == ()  # not handed on
    # Stable Diffusion inpainting uses the prompt: no warning for it
    sd = _pipeline_dir(tmp_path, "StableDiffusionInpaintPipeline")
    args[0] = str(sd)
    rc, _, err = _run([*args, "--prompt", "a red shirt", "--resolution", "32x24"], capsys)
    assert rc is None and "warning" not in err and no_model[-1]["resolution"] == (32, 24)
    # a checkpoint: trained resolution, garment-image conditioning
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    args[0] = str(ckpt)
    rc, _, err = _run([*args, "--prompt", "a red shirt", "--resolution", "64x48", "--set", "diffusion.sample_steps=3"],
                      capsys)
    assert rc is None
    assert "warning: --resolution is ignored" in err and "data.resolution" in err
    assert "warning: --prompt is ignored" in err and "warning: --set" not in err
    assert no_model[-1]["resolution"] is None and no_model[-1]["overrides"] == ["diffusion.sample_steps=3"]


def test_analyze_hands_warnings_to_its_callback(pics, tmp_path, no_model):
    import apps.analyze as an

    warnings: list[str] = []
    with pytest.raises(ModelLoaded):
        an.analyze(_pipeline_dir(tmp_path, "PaintByExamplePipeline"), person=pics["person"],
                   mask=pics["person_mask"], garment=pics["garment_grey"], out=tmp_path / "o", prompt="x",
                   warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("--prompt is ignored")
