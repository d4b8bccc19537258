"""Scorer on a real int8 bundle; the error definition; agent modules stay torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.score import Scorer, window_errors
from agent.types import Window

pytest.importorskip("torch")
from training.synth import tiny_bundle


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    return Scorer(load_bundle(tiny_bundle(tmp_path_factory.mktemp("s") / "tiny", window=16)), threads=1)


def _windows(n: int, rng: np.random.Generator) -> list[Window]:
    base = np.array([40.0, 2.0, 3.0], dtype=np.float32)
    return [
        Window(f"pump-{i % 2}", 100.0 + i, 115.0 + i, (base + rng.normal(0, 0.3, (16, 3))).astype(np.float32))
        for i in range(n)
    ]


@pytest.mark.parametrize("shape", [(1, 32, 8), (5, 64, 3), (300, 17, 5)])
def test_window_errors_are_bit_identical_to_np_mean(shape: tuple[int, int, int]) -> None:
    """Thresholds calibrated offline and stored scores depend on the exact float64 values: the fast
    form (sum / n) must equal the mean over time, then over channels, to the last bit."""
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(np.float32)
    r = (x + 0.1 * rng.normal(size=shape)).astype(np.float32)
    per_ref = np.mean((x.astype(np.float64) - r.astype(np.float64)) ** 2, axis=1)
    total, per = window_errors(x, r)
    assert np.array_equal(per, per_ref)
    assert np.array_equal(total, per_ref.mean(axis=1))


def test_window_errors_by_hand() -> None:
    x = np.zeros((1, 2, 2))
    r = np.array([[[1.0, 0.0], [3.0, 2.0]]])
    total, per = window_errors(x, r)
    # channel 0: (1 + 9) / 2 = 5; channel 1: (0 + 4) / 2 = 2; total = mean = 3.5
    np.testing.assert_allclose(per, [[5.0, 2.0]])
    np.testing.assert_allclose(total, [3.5])
    with pytest.raises(ValueError, match="matching"):
        window_errors(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))


def test_scorer_properties(scorer: Scorer) -> None:
    assert scorer.channels == ["temperature", "vibration", "pressure"]
    assert (scorer.window, scorer.stride, scorer.period) == (16, 4, 1.0)
    assert scorer.model_id == scorer.bundle.model_id


def test_score_batch_matches_one_by_one(scorer: Scorer) -> None:
    ws = _windows(5, np.random.default_rng(0))
    batch = scorer.score(ws)
    single = [scorer.score([w])[0] for w in ws]
    assert [s.device for s in batch] == [w.device for w in ws]
    assert [s.end_ts for s in batch] == [w.end_ts for w in ws]
    for a, b in zip(batch, single, strict=True):
        # DynamicQuantizeLSTM picks its activation scale per run, so batch company shifts an error a
        # little (measured <= 0.2 % even next to a 100-sigma outlier); far below alert margins.
        assert a.error == pytest.approx(b.error, rel=5e-3)
        assert a.model_id == scorer.model_id
        assert set(a.channel_errors) == set(scorer.channels)
        assert a.error == pytest.approx(np.mean(list(a.channel_errors.values())), rel=1e-6)
    assert scorer.score([]) == []


def test_scaling_follows_manifest(scorer: Scorer) -> None:
    x = np.array([[42.0, 2.5, 3.3]], dtype=np.float32)
    np.testing.assert_allclose(scorer.scale(x), [[1.0, 1.0, 1.0]], rtol=1e-6)


def test_bad_windows_are_refused(scorer: Scorer) -> None:
    w = _windows(1, np.random.default_rng(1))[0]
    w.data[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        scorer.score([w])
    short = Window("pump-1", 0.0, 7.0, np.zeros((8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"pump-1 ending 7.0: shape \[8, 3\], the model needs \[16, 3\]"):
        scorer.score([short])
    with pytest.raises(ValueError, match=r"\[batch, 16, 3\]"):
        scorer.errors(np.zeros((2, 8, 3), dtype=np.float32))


def test_attribution_names_the_abnormal_channel(scorer: Scorer) -> None:
    w = _windows(1, np.random.default_rng(2))[0]
    w.data[:, 2] += 30.0  # pressure far off its scale (0.3 bar)
    s = scorer.score([w])[0]
    z = scorer.attribution(s)
    assert max(z, key=z.__getitem__) == "pressure"


def test_agent_modules_do_not_import_torch() -> None:
    code = (
        "import sys, agent.bundle, agent.score, agent.resample, agent.evaluate; "
        "bad = [m for m in ('torch', 'onnx', 'training', 'sklearn') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert r.returncode == 0, f"agent imports {r.stdout.strip()} {r.stderr[-500:]}"


# -- latent T2 bundles: the score is the code's Hotelling T2, attribution stays the reconstruction's ---
@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("lat") / "tiny", window=16, latent=True)


def test_latent_bundle_scores_the_codes_t2(latent_dir: Path) -> None:
    bundle = load_bundle(latent_dir)
    spec = bundle.manifest.score
    assert spec is not None and spec.kind == "latent_t2"
    scorer = Scorer(bundle)
    wins = _windows(6, np.random.default_rng(7))
    scores = scorer.score(wins)
    # by hand, from the model's own outputs: a plain loop over the quadratic form
    sess = bundle.session  # the same session options: int8 kernels differ slightly between settings
    x = np.stack([scorer.scale(w.data) for w in wins])
    recon, codes = sess.run(["recon", "latent"], {"x": x})
    mu, inv = np.array(spec.mean), np.array(spec.inv_cov)
    for s, code, xi, ri in zip(scores, codes, x, recon, strict=True):
        d = code.astype(np.float64) - mu
        t2 = sum(d[i] * inv[i, j] * d[j] for i in range(len(d)) for j in range(len(d)))
        assert s.error == pytest.approx(t2, rel=1e-9)
        per = ((xi.astype(np.float64) - ri) ** 2).mean(axis=0)
        assert list(s.channel_errors.values()) == pytest.approx(per.tolist(), rel=1e-6)
    # a window far from normal has a larger T2 than the normal ones
    far = Window("pump-9", 0.0, 15.0, np.full((16, 3), [60.0, 9.0, 0.5], dtype=np.float32))
    assert scorer.score([far])[0].error > max(s.error for s in scores)


def test_latent_score_without_the_output_is_refused(tmp_path: Path, latent_dir: Path) -> None:
    from agent.bundle import BundleError, Manifest, finalize_bundle

    plain = tiny_bundle(tmp_path / "plain", window=16)  # its model has no `latent` output
    spec = load_bundle(latent_dir).manifest.score
    m = load_bundle(plain).manifest
    finalize_bundle(plain, Manifest.model_validate({**m.model_dump(), "score": spec.model_dump()}))
    with pytest.raises(BundleError, match="needs model output 'latent'"):
        load_bundle(plain)


def test_latent_score_shape_is_validated() -> None:
    from pydantic import ValidationError

    from agent.bundle import LatentScore

    with pytest.raises(ValidationError, match="must be 2 x 2"):
        LatentScore(mean=[0.0, 0.0], inv_cov=[[1.0, 0.0]])
    with pytest.raises(ValidationError, match="non-finite"):
        LatentScore(mean=[0.0], inv_cov=[[float("nan")]])
