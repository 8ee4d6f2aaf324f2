"""Earlier edits that no longer hold, found on the model as it is now so that the next batch can
write them again (hyperparameter ``rewrite_lapsed``).

An edit has lapsed when greedy decoding after its own prompt no longer gives its new target:
the target's tokens are not each the model's most probable one, teacher-forced. Later batches
move it (their updates reach its keys), and in a long sequence a solve that preserves the
earlier keys writes only part of a new target change, so many edits never reach that point.
Only what the user asked for is checked: the request's prompt and new target.
"""
from __future__ import annotations

import logging
from typing import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import WeightDeltas
from memit.predict import score_continuations
from memit.requests import EditRequest, conflict_key, parse_requests

log = logging.getLogger(__name__)


def standing_requests(earlier: Sequence[WeightDeltas], current: Sequence[EditRequest]) -> list[EditRequest]:
    """The earlier edits' requests (oldest first) that a later one has not replaced: of several
    asking for the same subject in the same prompt, only the last counts, and those the
    ``current`` batch asks for again are left to it."""
    latest: dict[tuple[str, str], EditRequest] = {}
    for edit in earlier:
        for request in parse_requests(edit.manifest.get("requests") or []):
            key = conflict_key(request)
            latest.pop(key, None)  # a replaced edit moves to its replacement's place
            latest[key] = request
    for request in current:
        latest.pop(conflict_key(request), None)
    return list(latest.values())


def lapsed_requests(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], limit: int, batch_size: int = 64
) -> list[EditRequest]:
    """At most ``limit`` of ``requests`` whose new target greedy decoding no longer gives after
    their prompt, the narrowest misses (lowest mean NLL of the target) first."""
    if not requests:
        return []
    scores = score_continuations(model, tok, [r.filled_prompt() for r in requests], [r.target_new for r in requests], batch_size)
    missed = [(score.mean_nll, i) for i, score in enumerate(scores) if not all(score.argmax_matches)]
    chosen = [requests[i] for _, i in sorted(missed)[:limit]]
    log.info("%d of %d earlier edits have lapsed; writing %d of them again", len(missed), len(requests), len(chosen))
    return chosen
