"""Field recovery on the planted synthetic data: does the search open the fields that matter per group?

The synthetic generator (:mod:`ihas_lightning.data.synthetic`) plants, for each latent group, a
disjoint set of relevant fields (``truth.json``: ``groups`` -> relevant field names,
``noise_fields``, ``key_field``). iHAS's premise is instance-wise selection, so the deterministic
gate masks, averaged over a group's samples and a field's dims, should be high on that group's
relevant fields and low on its noise fields (which include the other groups' relevant fields).

:func:`field_recovery` scores a ``{group: {field: mean mask}}`` table (per latent group from the
search stage, or per cluster after mapping clusters to groups) against the truth. A field is
*opened* for a group when its mean mask is ``>= threshold`` (0.5: the majority rule the retraining
stage uses). The key field (which identifies the group and drives no label) is reported but not
scored; every other field is relevant or noise for each group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def field_recovery(
    mean_mask_per_group_field: Mapping[Any, Mapping[str, float]],
    truth: Mapping[str, Any],
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Per-group precision/recall of the opened fields vs the planted relevant fields.

    Returns ``{"groups": {g: {...}}, "macro_precision", "macro_recall", "relevant_opened_more_all",
    "threshold"}``; per group: opened / relevant fields, precision, recall, F1, mean mask on relevant
    and on noise fields, ``relevant_opened_more`` (mean relevant > mean noise) and
    ``separation`` (min relevant > max noise)."""
    planted = {str(g): list(f) for g, f in truth["groups"].items()}
    key = truth.get("key_field")
    out: dict[str, Any] = {"threshold": threshold, "groups": {}}
    precisions, recalls, more = [], [], []
    for g, fields in mean_mask_per_group_field.items():
        g = str(g)
        if g not in planted:
            raise KeyError(f"group {g!r} is not in truth.json groups {sorted(planted)}")
        relevant = set(planted[g])
        scored = {f: float(v) for f, v in fields.items() if f != key}
        opened = {f for f, v in scored.items() if v >= threshold}
        tp = len(opened & relevant)
        precision = tp / len(opened) if opened else 0.0
        recall = tp / len(relevant) if relevant else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rel_vals = [scored[f] for f in relevant if f in scored]
        noise_vals = [v for f, v in scored.items() if f not in relevant]
        mean_rel = sum(rel_vals) / len(rel_vals) if rel_vals else float("nan")
        mean_noise = sum(noise_vals) / len(noise_vals) if noise_vals else float("nan")
        rec = {
            "relevant": sorted(relevant),
            "opened": sorted(opened),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "mean_mask_relevant": mean_rel,
            "mean_mask_noise": mean_noise,
            "relevant_opened_more": bool(mean_rel > mean_noise) if rel_vals and noise_vals else None,
            "separation": bool(min(rel_vals) > max(noise_vals)) if rel_vals and noise_vals else None,
        }
        if key is not None and key in fields:
            rec["key_field_mask"] = float(fields[key])
        out["groups"][g] = rec
        precisions.append(precision)
        recalls.append(recall)
        more.append(rec["relevant_opened_more"])
    n = len(precisions)
    out["macro_precision"] = sum(precisions) / n if n else None
    out["macro_recall"] = sum(recalls) / n if n else None
    out["relevant_opened_more_all"] = all(bool(m) for m in more) if n else None
    return out
