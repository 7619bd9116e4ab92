"""`python -m tryon_eval` end to end on a tiny checkpoint trained for 2 steps on synthetic data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FAST = ["--limit", "4", "--batch-size", "3", "--steps", "2", "--device", "cpu", "--no-progress",
        "--fid-backend", "random", "--lpips-backend", "random"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    from configs import load_config
    from train import Trainer

    tmp = tmp_path_factory.mktemp("evalrun")
    Trainer(load_config(overrides=tiny_overrides(tmp, **{"train.max_steps": 2, "data.num_val": 2}))).fit()
    return tmp / "run"


@pytest.fixture(scope="module")
def evaluated(run_dir, tmp_path_factory) -> Path:
    from tryon_eval.__main__ import main

    out = tmp_path_factory.mktemp("eval") / "out"
    assert main([str(run_dir), "--out", str(out), *FAST]) == 0
    return out


def _pngs(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.png"))}


def test_cli_writes_results_that_match_clean_fid(evaluated, monkeypatch):
    import cleanfid.fid as cf
    from skimage.metrics import structural_similarity

    from tryon_data import SyntheticTryOn, colour_error, pixel_error
    from tryon_eval.metrics import RandomFeatures

    res = json.loads((evaluated / "results.json").read_text())
    assert set(res["modes"]) == {"paired", "unpaired"} and res["step"] == 2
    assert "NOT comparable" in res["fid_backend"] and "NOT comparable" in (evaluated / "results.md").read_text()
    assert len(_pngs(evaluated / "real")) == 4
    fx = RandomFeatures()  # what --fid-backend random uses
    monkeypatch.setattr(cf, "build_feature_extractor", lambda *a, **k: fx)
    for mode in ("paired", "unpaired"):
        m = res["modes"][mode]
        assert m["n"] == 4 and m["missing"] == 0 and m["generated_now"] == 4
        gen, real = str(evaluated / mode / "images"), str(evaluated / "real")
        fid = cf.compute_fid(gen, real, mode="clean", custom_feat_extractor=fx, device=CPU, num_workers=0,
                             verbose=False)
        np.random.seed(0)  # KID's subset draws (float32 sums depend on their order); the evaluation seeds 0
        kid = cf.compute_kid(gen, real, mode="clean", device=CPU, num_workers=0, verbose=False)
        assert m["fid"] == pytest.approx(fid, rel=1e-9) and m["kid"] == pytest.approx(kid, rel=1e-9, abs=1e-15)
        assert m["kid_x1000"] == pytest.approx(1000 * m["kid"])
        for key in ("box_miou", "box_miou_random", "box_miou_whole"):
            assert 0 <= m[key] <= 1
        assert -3 <= m["imacs_g"] <= 1 and -3 <= m["imacs_r"] <= 1
    # paired SSIM from the files, recomputed directly with skimage
    p = res["modes"]["paired"]
    names = sorted(_pngs(evaluated / "paired" / "images"))
    ssims = [structural_similarity(np.asarray(Image.open(evaluated / "paired" / "images" / n)),
                                   np.asarray(Image.open(evaluated / "real" / n)), gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=255, channel_axis=-1) for n in names]
    assert p["ssim"] == pytest.approx(np.mean(ssims)) and p["lpips"] > 0
    assert res["modes"]["unpaired"]["lpips"] is None
    # per-sample colour error is that of the saved 8-bit images
    side = json.loads((evaluated / "paired" / "samples.json").read_text())
    assert side["settings"]["steps"] == 2 and len(side["samples"]) == 4
    ds = SyntheticTryOn(4, split="test")
    for i in range(4):
        s = ds[i]
        img = torch.from_numpy(np.asarray(Image.open(evaluated / "paired" / "images" / f"{s['name']}.png"),
                                          np.float32)).permute(2, 0, 1) / 127.5 - 1
        err = float(colour_error(img, s["person"], s["mask"])[0])
        assert side["samples"][s["name"]]["colour_error"] == pytest.approx(err, rel=1e-6)  # scored on the PNG
        pix = float(pixel_error(img, s["person"], s["mask"])[0])
        assert side["samples"][s["name"]]["pixel_error"] == pytest.approx(pix, rel=1e-6)
    assert p["colour_error"] == pytest.approx(np.mean([v["colour_error"] for v in side["samples"].values()]))


def test_second_run_keeps_outputs_and_injected_extractor_matches(evaluated, run_dir):
    import cleanfid.fid as cf

    from tryon_eval import RandomFeatures, build_lpips, evaluate

    before = {m: _pngs(evaluated / m / "images") for m in ("paired", "unpaired")}
    sidecar = (evaluated / "paired" / "samples.json").read_text()
    fx = RandomFeatures(dim=8, seed=5)
    res = evaluate(run_dir, out=evaluated, limit=4, batch_size=3, steps=2, device="cpu", progress=False,
                   feature_extractor=fx, lpips_model=build_lpips("random"))
    assert all(res["modes"][m]["generated_now"] == 0 for m in before)
    assert {m: _pngs(evaluated / m / "images") for m in before} == before
    assert (evaluated / "paired" / "samples.json").read_text() == sidecar
    fid = cf.compute_fid(str(evaluated / "paired" / "images"), str(evaluated / "real"), mode="clean",
                         custom_feat_extractor=fx, device=CPU, num_workers=0, verbose=False)
    assert res["modes"]["paired"]["fid"] == pytest.approx(fid, rel=1e-6)
    assert "injected" in res["fid_backend"]
    # one output lost: only that one is generated again
    victim = sorted(before["unpaired"])[1]
    (evaluated / "unpaired" / "images" / victim).unlink()
    res = evaluate(run_dir, out=evaluated, limit=4, batch_size=3, steps=2, device="cpu", progress=False,
                   fid_backend="random", lpips_backend="random")
    assert res["modes"]["unpaired"]["generated_now"] == 1 and res["modes"]["paired"]["generated_now"] == 0
    after = _pngs(evaluated / "unpaired" / "images")
    assert set(after) == set(before["unpaired"])
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in before["unpaired"].items()
                                                               if k != victim}


def test_other_settings_in_the_same_folder_are_refused(evaluated, run_dir, capsys):
    from tryon_eval.__main__ import main

    args = [str(run_dir), "--out", str(evaluated), *FAST]
    args[args.index("--steps") + 1] = "3"
    assert main(args) == 2
    assert "other settings" in capsys.readouterr().err


def test_missing_inception_fails_before_generating(run_dir, tmp_path, capsys, monkeypatch):
    from tryon_eval.__main__ import main

    out = tmp_path / "never"
    nope = tmp_path / "weights" / "inception-2015-12-05.pt"
    assert main([str(run_dir), "--out", str(out), "--inception", str(nope), "--lpips-backend", "random",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "inception-2015-12-05.pt" in err and str(nope) in err and "download https://" in err
    assert not out.exists()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("I2AM_ALEXNET", raising=False)
    assert main([str(run_dir), "--out", str(out), "--fid-backend", "random", "--no-progress"]) == 2
    assert "alexnet-owt-7be5be79.pth" in capsys.readouterr().err and not out.exists()


def test_checkpoint_resolution(run_dir, tmp_path, capsys):
    from train.checkpoint import CheckpointError, resolve_checkpoint
    from tryon_eval.__main__ import main
    from tryon_eval.detect import main as detect_main
    from tryon_eval.generate import EvalError

    ckpt = resolve_checkpoint(run_dir)
    assert ckpt.name == "checkpoint-0000002" and resolve_checkpoint(ckpt) == ckpt
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty_run")
    # Both CLIs turn it into a one-line error; `evaluate` raises it as an EvalError.
    assert main([str(tmp_path), *FAST]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    assert detect_main([str(tmp_path), "--synthetic", "--limit", "1"]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    from tryon_eval import evaluate

    with pytest.raises(EvalError, match="neither a checkpoint"):
        evaluate(tmp_path, fid_backend="random", lpips_backend="random", progress=False)


def test_detect_cli_on_synthetic_and_coco(run_dir, tmp_path, capsys):
    from tryon_eval.detect import main

    out = tmp_path / "synthetic.json"
    assert main([str(run_dir), "--synthetic", "--limit", "3", "--steps", "2", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 3 and len(res["per_image"]) == 3
    assert all(0 <= res[k] <= 1 for k in ("miou", "miou_random", "miou_whole"))
    # COCO style: two images with a 15 % box each
    images = tmp_path / "coco"
    images.mkdir()
    ann = {"images": [], "annotations": []}
    for i in range(2):
        Image.new("RGB", (60, 80), (40 + 80 * i, 120, 200)).save(images / f"{i}.png")
        ann["images"].append({"id": i, "file_name": f"{i}.png", "width": 60, "height": 80})
        ann["annotations"].append({"image_id": i, "bbox": [10, 20, 24, 30]})
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    capsys.readouterr()
    assert main([str(run_dir), "--images", str(images), "--annotations", str(tmp_path / "ann.json"),
                 "--steps", "2", "--device", "cpu", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 2 and printed["skipped_no_box"] == 0
    assert printed["miou_whole"] == pytest.approx(720 / 4800)


def test_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "tryon_eval", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--inception" in done.stdout and "--limit" in done.stdout


# ----------------------------------------------------------------------- exact resumption
RESUME = dict(limit=5, steps=2, device="cpu", progress=False, fid_backend="random", lpips_backend="random")
# Read from the PNGs (or scored on the 8-bit images): equal to the last bit when the bytes are.
METRICS = ("n", "missing", "fid", "kid", "lpips", "ssim", "colour_error", "pixel_error", "box_miou",
           "box_miou_random", "box_miou_whole", "imacs_g_undefined", "imacs_r_undefined")
# From the float attention maps, whose batched matmuls round differently at another batch size;
# IMACS min-max normalises the map, which can magnify that rounding to ~1e-5 relative (seen:
# -0.7764806 against -0.7764902), so they are compared to 1e-4: a wrong map is off by far more.
MAP_METRICS = ("imacs_g", "imacs_r")
MAP_REL = 1e-4


def _same_results(a: dict, b: dict) -> None:
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
    for k in MAP_METRICS:
        assert a[k] == pytest.approx(b[k], rel=MAP_REL), k


def _same_sidecars(a: Path, b: Path) -> None:
    sa, sb = json.loads(a.read_text()), json.loads(b.read_text())
    assert sa["settings"] == sb["settings"] and set(sa["samples"]) == set(sb["samples"])
    for name, row in sa["samples"].items():
        other = sb["samples"][name]
        assert {k: v for k, v in row.items() if k not in MAP_METRICS} == \
            {k: v for k, v in other.items() if k not in MAP_METRICS}, name
        for k in MAP_METRICS:
            assert row[k] == pytest.approx(other[k], rel=MAP_REL, abs=1e-5), (name, k)


@pytest.fixture(scope="module")
def uninterrupted(run_dir, tmp_path_factory) -> tuple[Path, dict]:
    from tryon_eval import evaluate

    out = tmp_path_factory.mktemp("whole") / "out"
    return out, evaluate(run_dir, out=out, batch_size=3, **RESUME)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_killed_evaluation_resumes_to_the_uninterrupted_result(run_dir, uninterrupted, tmp_path, monkeypatch):
    """Killed between writing a temporary PNG and renaming it (the 4th paired image, in the
    second chunk of 2), then rerun with batch size 2: the same bytes and numbers as one
    uninterrupted run with batch size 3, and the leftover temporary file is never read.
    Then a lost image is made again."""
    import os
    import shutil

    from tryon_eval import evaluate

    whole_dir, whole = uninterrupted
    real_replace, written, leftovers = os.replace, [], []

    def killed_at_the_fourth(src, dst):
        if Path(dst).parent == tmp_path / "out" / "paired" / "images":
            written.append(dst)
            if len(written) == 4:  # what SIGKILL leaves: the temporary file, nothing renamed
                shutil.copy(src, str(src) + ".kept")  # save_png's `finally` deletes src on an exception
                leftovers.append(Path(src))
                raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        evaluate(run_dir, out=tmp_path / "out", batch_size=2, **RESUME)
    monkeypatch.undo()
    leftover = leftovers[0]
    os.replace(str(leftover) + ".kept", leftover)
    assert Image.open(leftover).format == "PNG"  # a whole picture, under a name no image reader takes
    assert not leftover.name.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy"))
    side = json.loads((tmp_path / "out" / "paired" / "samples.json").read_text())
    assert len(side["samples"]) == 2 and len(_bytes(tmp_path / "out" / "paired" / "images")) == 3

    resumed = evaluate(run_dir, out=tmp_path / "out", batch_size=2, **RESUME)
    assert resumed["modes"]["paired"]["generated_now"] == 3 and resumed["modes"]["unpaired"]["generated_now"] == 5
    assert not leftover.exists()  # cleaned up by the rerun
    for mode in ("paired", "unpaired"):
        images = _bytes(tmp_path / "out" / mode / "images")
        assert len(images) == 5 and images == _bytes(whole_dir / mode / "images"), mode
        _same_results(resumed["modes"][mode], whole["modes"][mode])
        _same_sidecars(tmp_path / "out" / mode / "samples.json", whole_dir / mode / "samples.json")
    # A lost output remade at the uninterrupted run's batch size: its batch [3, 4] is recomputed
    # whole, so even the float maps agree to the last bit (sample 4 alone, a batch of one, gets
    # IMACS that differ in the 7th digit).
    folder = tmp_path / "out" / "unpaired"
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("images/*.png")}
    lost = ["synthetic_test_000004"]
    for name in lost:
        (folder / "images" / f"{name}.png").unlink()
    again = evaluate(run_dir, out=tmp_path / "out", batch_size=3, **RESUME)
    assert again["modes"]["unpaired"]["generated_now"] == 1
    assert _bytes(folder / "images") == _bytes(whole_dir / "unpaired" / "images")
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("images/*.png") if p.stem not in lost} == \
        {k: v for k, v in kept.items() if k[:-4] not in lost}  # the others were not rewritten
    _same_results(again["modes"]["unpaired"], whole["modes"]["unpaired"])
    remade = json.loads((folder / "samples.json").read_text())["samples"]
    truth = json.loads((whole_dir / "unpaired" / "samples.json").read_text())["samples"]
    assert {n: remade[n] for n in lost} == {n: truth[n] for n in lost}


def test_a_leftover_temporary_png_is_not_counted(run_dir, uninterrupted, tmp_path, monkeypatch):
    """A temporary file of save_png (under the name save_png gives it, holding a white
    picture) and a PNG no sample owns, in a finished images folder: nothing is generated
    and every number is unchanged."""
    import os
    import shutil

    from common.images import save_png
    from tryon_eval import evaluate

    whole_dir, whole = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(whole_dir, out)
    images = out / "paired" / "images"
    temporary, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (temporary.append(Path(src)), real_replace(src, dst))[1])
    save_png(np.full((8, 8, 3), 255, np.uint8), images / "stray.png")
    monkeypatch.undo()
    (images / "stray.png").rename(temporary[0])  # now a leftover under save_png's temporary name
    save_png(np.zeros((8, 8, 3), np.uint8), images / "not_a_sample.png")
    res = evaluate(run_dir, out=out, batch_size=3, **RESUME)
    for mode in ("paired", "unpaired"):
        assert res["modes"][mode]["generated_now"] == 0
        assert res["modes"][mode] == {**whole["modes"][mode], "generated_now": 0}  # nothing re-read differs


def test_a_negative_seed_is_refused_before_anything_runs(run_dir, tmp_path):
    from tryon_eval import evaluate
    from tryon_eval.generate import EvalError

    with pytest.raises(EvalError, match="--seed must be >= 0, got -1"):
        evaluate(run_dir, out=tmp_path / "never", seed=-1, **RESUME)
    assert not (tmp_path / "never").exists()
