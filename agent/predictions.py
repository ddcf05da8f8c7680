"""From model outputs to `edgeforge.result/1` messages: softmax, top-k, threshold, policy.

A result (on `<prefix>/<device>/result`, see agent/telemetry.py for the topic list):

    {"schema": "edgeforge.result/1", "device": ..., "seq": ..., "ts": ...,
     "source": "folder", "source_id": "cat_001.png", "captured_ts": ...,
     "top": [{"label": "cat", "score": 0.912}, ...],          # best first
     "capture_ms": ..., "preprocess_ms": ..., "infer_ms": ..., "total_ms": ...,
     "model_sha256": "..."}

An input that could not be used gives `"top": []` and an `"error"` saying why. Results of
`folder` and `mqtt` are durable (through the spool, like telemetry) and each input gets one;
`video` and `camera` results are sent at QoS 0 while connected and follow the publishing
policy: `every` result, only when the top label `change`s, or at most `max_per_s` (`rate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import LIVE_KINDS, SourceConfig
from agent.sources import Frame, Reply

SCORE_DIGITS = 6


@dataclass(frozen=True)
class Prediction:
    """What the loop hands the publisher for one input."""

    fields: dict[str, Any]  # everything but schema, device, seq and ts
    durable: bool
    reply: Reply | None = None
    done: Callable[[bool | None, str], None] | None = field(default=None, repr=False)
    marker: str | None = None  # spooled with the result (agent/spool.py: answered)


def softmax(logits: npt.ArrayLike) -> np.ndarray:
    """Scores of a batch of logits, in float64: the int8 model's logits are bit-exact across
    x86 and ARM, but float32 exp is not (vectorised differently), and a last-bit difference
    can change the sixth decimal a result reports; in float64 it cannot, in practice."""
    # asarray, then a float64 copy (an engine's output stays untouched): np.array(tensor)
    # passes copy= to torch's __array__, which does not take it (a DeprecationWarning).
    z = np.asarray(logits).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """Turns a batch of logits into results for its frames (one per loop; loop thread)."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.live = cfg.kind in LIVE_KINDS
        self._last_label: str | None = None
        self._next_at = -math.inf

    def top(self, probs: np.ndarray, classes: tuple[str, ...]) -> list[dict[str, Any]]:
        """The top_k labels of one row of `softmax`, best first (ties: the lower class
        index), at or above min_score."""
        idx = np.argsort(-probs, kind="stable")[:min(self.cfg.top_k, len(classes))]
        return [{"label": classes[int(i)], "score": round(float(probs[i]), SCORE_DIGITS)}
                for i in idx if probs[i] >= self.cfg.min_score]

    def wanted(self, top: list[dict[str, Any]], now: float) -> bool:
        """Whether a live source's result is published under source.publish (always for
        folder and mqtt: every file and request is answered)."""
        if not self.live or self.cfg.publish == "every":
            return True
        if self.cfg.publish == "change":
            label = top[0]["label"] if top else None
            changed, self._last_label = label != self._last_label, label
            return changed
        if now < self._next_at:
            return False
        self._next_at = now + 1.0 / self.cfg.max_per_s
        return True

    def result(self, frame: Frame, top: list[dict[str, Any]], stages_s: dict[str, float],
               sha256: str, error: str | None = None, engine: str | None = None) -> Prediction:
        """The Prediction for `frame`; `stages_s` holds capture, preprocess, infer, total;
        `engine` ran the model (none when the input never reached it)."""
        return result(self.cfg.kind, frame, top, stages_s, sha256, not self.live, error, engine)


def result(kind: str, frame: Frame, top: list[dict[str, Any]], stages_s: dict[str, float],
           sha256: str, durable: bool, error: str | None = None,
           engine: str | None = None) -> Prediction:
    """The Prediction for `frame` from a `kind` source (also the publisher's busy answer)."""
    fields: dict[str, Any] = {
        "source": kind, "source_id": frame.source_id,
        "captured_ts": round(frame.ts, 3), "top": top,
        **{f"{k}_ms": round(v * 1000.0, 3) for k, v in stages_s.items()},
        "model_sha256": sha256,
    }
    if engine is not None:
        fields["engine"] = engine
    if frame.reply is not None:
        fields["request_id"] = frame.reply.request_id
    if error is not None:
        fields["error"] = error
    return Prediction(fields, durable=durable, reply=frame.reply, done=frame.done,
                      marker=frame.marker)
