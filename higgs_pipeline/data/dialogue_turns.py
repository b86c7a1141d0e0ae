"""The dialogue rules at ingest: rows sharing a `dialogue_id` are one conversation, ordered by an integer `turn`.

A bad `turn` (empty, not a whole number, repeated, a gap, or a turn without a dialogue_id) is `bad_turn`; a
dialogue with any rejected row is excluded whole, its other rows `dialogue_incomplete` naming the bad turn, so
every row is accounted for and a dialogue trains whole or not at all. Pure functions over the manifest's rows;
`data/screening.py` calls them at their places in its order, `transcript_check` calls `incomplete_dialogues`
again after its own rejections.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

DIALOGUE_COLUMNS = ("dialogue_id", "turn")
# Reject reasons this module adds to screening's, with what each means (shown in the reject table).
DIALOGUE_REJECT_REASONS: dict[str, str] = {
    "bad_turn": "turn is empty, not an integer, repeated or leaves a gap in its dialogue (or has no dialogue_id)",
    "dialogue_incomplete": "another row of the same dialogue was rejected: a dialogue trains whole or not at all",
}
_NUMBER = r"\+?\d+"  # a whole number >= 0 ("03" is 3)
_LISTED = 8  # turn numbers shown in a detail before "..."


def dialogue_columns(rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(dialogue_id, turn) stripped; a manifest without the columns has no dialogues."""
    empty = pd.Series([""] * len(rows), index=rows.index, dtype="str")
    dialogue = rows["dialogue_id"].astype("str").str.strip() if "dialogue_id" in rows else empty
    turn = rows["turn"].astype("str").str.strip() if "turn" in rows else empty
    return dialogue.reset_index(drop=True), turn.reset_index(drop=True)


def turn_problems(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """`bad_turn` rows and their details, aligned with `rows` (columns row, dialogue_id, turn).

    In a dialogue every row needs a whole-number turn, no number twice and none missing: the turns are n
    consecutive numbers from 0 or from 1. A gap is a fault of the whole dialogue (no row is the bad one), so all
    its rows are `bad_turn`; a repeated or malformed turn rejects those rows and `incomplete_dialogues` then
    rejects the rest. A turn on a row without a dialogue_id is refused too: the row would otherwise train as a
    lone utterance while its author meant it as part of a conversation.
    """
    dialogue, turn = dialogue_columns(rows)
    size = len(rows)
    bad, detail = np.zeros(size, dtype=bool), np.full(size, "", dtype=object)
    in_dialogue = (dialogue != "").to_numpy()
    has_turn = (turn != "").to_numpy()
    is_number = turn.str.fullmatch(_NUMBER).to_numpy(bool)

    orphan = ~in_dialogue & has_turn
    _mark(bad, detail, orphan, [f"turn {t!r} given without a dialogue_id" for t in turn[orphan]])
    empty = in_dialogue & ~has_turn
    _mark(bad, detail, empty, [f"dialogue {d!r}: turn is empty" for d in dialogue[empty]])
    malformed = in_dialogue & has_turn & ~is_number
    texts = [
        f"dialogue {d!r}: turn {t!r} is not a whole number"
        for d, t in zip(dialogue[malformed], turn[malformed], strict=True)
    ]
    _mark(bad, detail, malformed, texts)

    numbers = np.where(is_number, turn, "0").astype(np.int64)
    keyed = pd.DataFrame({"dialogue": dialogue, "turn": numbers, "row": rows["row"].to_numpy()})
    keyed = keyed[in_dialogue & is_number]
    repeated = keyed[keyed.duplicated(["dialogue", "turn"], keep=False)]
    if len(repeated):
        rows_of = repeated.groupby(["dialogue", "turn"])["row"].agg(lambda r: ", ".join(map(str, sorted(r))))
        mask = np.zeros(size, dtype=bool)
        mask[repeated.index.to_numpy()] = True
        pairs = zip(repeated["dialogue"], repeated["turn"], strict=True)
        _mark(bad, detail, mask, [f"dialogue {d!r}: turn {t} repeated (rows {rows_of[(d, t)]})" for d, t in pairs])
    _mark_gaps(bad, detail, dialogue, numbers, in_dialogue)
    return bad, detail


def _mark(bad: np.ndarray, detail: np.ndarray, mask: np.ndarray, texts: Sequence[str]) -> None:
    """Reject the rows of `mask` not already rejected; `texts` is aligned with the rows of `mask`."""
    positions = np.flatnonzero(mask)
    fresh = ~bad[positions]
    detail[positions[fresh]] = np.asarray(list(texts), dtype=object)[fresh]
    bad[positions[fresh]] = True


def _mark_gaps(
    bad: np.ndarray, detail: np.ndarray, dialogue: pd.Series, numbers: np.ndarray, member: np.ndarray
) -> None:
    """Every row of a dialogue whose turns (all well-formed, none repeated) are not 0..n-1 or 1..n."""
    table = pd.DataFrame({"dialogue": dialogue.to_numpy(), "turn": numbers, "bad": bad})[member]
    stats = table.groupby("dialogue", sort=False).agg(
        n=("turn", "size"), low=("turn", "min"), high=("turn", "max"), bad=("bad", "any")
    )
    gapped = stats[~stats["bad"] & ((stats["low"] > 1) | (stats["high"] - stats["low"] + 1 != stats["n"]))]
    if gapped.empty:
        return
    found = table[table["dialogue"].isin(gapped.index)].groupby("dialogue")["turn"].agg(sorted)
    texts = {}
    for name, turns in found.items():
        present = set(turns)
        start = 0 if turns[0] == 0 else 1
        missing = next(t for t in range(start, turns[-1] + 1) if t not in present)
        texts[name] = f"dialogue {name!r}: turn {missing} missing (turns found: {_listing(turns)})"
    mask = member & dialogue.isin(gapped.index).to_numpy()
    _mark(bad, detail, mask, [texts[d] for d in dialogue[mask]])


def _listing(numbers: Sequence[object]) -> str:
    shown = ", ".join(map(str, numbers[:_LISTED]))
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > _LISTED else "")


def incomplete_dialogues(rows: pd.DataFrame, reason: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows still open (reason "") of a dialogue that has a rejected row, with a detail naming that turn.

    Run after every other check: only then is it known which turns survive. The detail names the earliest
    rejected turn (by turn number, else row) and its reason, and how many more turns were rejected.
    """
    dialogue, turn = dialogue_columns(rows)
    reason = np.asarray(reason, dtype=object)
    in_dialogue = (dialogue != "").to_numpy()
    rejected = in_dialogue & (reason != "")
    size = len(rows)
    if not rejected.any():
        return np.zeros(size, dtype=bool), np.full(size, "", dtype=object)
    order = pd.to_numeric(turn, errors="coerce").fillna(np.inf).to_numpy()
    culprits = pd.DataFrame(
        {
            "dialogue": dialogue.to_numpy(),
            "turn": turn.to_numpy(),
            "order": order,
            "row": rows["row"].to_numpy(),
            "reason": reason,
        }
    )[rejected].sort_values(["order", "row"], kind="stable")
    first = culprits.drop_duplicates("dialogue").set_index("dialogue")
    counts = culprits["dialogue"].value_counts()
    mask = in_dialogue & (reason == "") & dialogue.isin(first.index).to_numpy()
    texts = {}
    for name, culprit in first.iterrows():
        named = f"turn {_shown(culprit['turn'])}" if culprit["turn"] else "a turn"
        more = counts[name] - 1
        extra = f" (and {more} more rejected turn{'s' if more > 1 else ''})" if more else ""
        texts[name] = f"dialogue {name!r}: {named} (row {culprit['row']}) was rejected as {culprit['reason']}{extra}"
    detail = np.full(size, "", dtype=object)
    detail[mask] = [texts[d] for d in dialogue[mask]]
    return mask, detail


def screen_dialogues(rows: pd.DataFrame, reason: np.ndarray, detail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Screening's verdicts (reason "" = accepted so far) with the dialogue rules applied, as new arrays.

    The first failing check wins, as in screening: rows already rejected keep their reason, `bad_turn` goes to
    the open rows with a bad turn, then `dialogue_incomplete` to the open rows of every dialogue that lost a
    row. Screening itself calls the two steps at their places in its order (`turn_problems` with the row-level
    checks, before any file is probed; `incomplete_dialogues` last).
    """
    reason, detail = np.asarray(reason, dtype=object).copy(), np.asarray(detail, dtype=object).copy()
    for step in (turn_problems, lambda r: incomplete_dialogues(r, reason)):
        mask, texts = step(rows)
        mask = mask & (reason == "")
        name = "bad_turn" if step is turn_problems else "dialogue_incomplete"
        reason[mask], detail[mask] = name, texts[mask]
    return reason, detail


def _shown(turn: str) -> str:
    """A turn as a detail shows it: a number as is, anything else quoted (so "turn '2.5'" reads as written)."""
    return turn if re.fullmatch(_NUMBER, turn) else repr(turn)
