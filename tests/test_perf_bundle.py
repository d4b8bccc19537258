"""Bundle sessions run without onnxruntime's CPU arena (issue #6 follow-up: memory), scores unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.bundle import load_bundle

MODEL = Path(__file__).resolve().parents[1] / "models" / "default"


def test_sessions_have_no_cpu_arena_and_score_like_an_arena_session() -> None:
    b = load_bundle(MODEL)
    for sess in (b.session, b.make_session(2)):
        assert sess.get_session_options().enable_cpu_mem_arena is False
    # The same options with the arena on, as before the change: the outputs must be identical.
    so = b.session.get_session_options()
    so.enable_cpu_mem_arena = True
    with_arena = ort.InferenceSession(str(b.model_path), sess_options=so, providers=["CPUExecutionProvider"])
    inp = b.session.get_inputs()[0]
    x = np.random.default_rng(7).standard_normal((5, *inp.shape[1:])).astype(np.float32)
    for rows in (x[:1], x):  # batch 1 (the agent) and a batch (after which the arena would keep buffers)
        (got,) = b.session.run(None, {inp.name: rows})[:1]
        (ref,) = with_arena.run(None, {inp.name: rows})[:1]
        np.testing.assert_array_equal(got, ref)
