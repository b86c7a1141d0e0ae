"""The checkpoint choice, the collapse flag, the retention gate and the candidate thinning, on hand-made numbers
whose answer is known (pure functions: no model, no process)."""

from __future__ import annotations

import math

import pytest

from higgs_pipeline.evaluation.choice import Scores, Tolerances, choose, collapse_reasons
from higgs_pipeline.evaluation.gates import promotion_blockers, quality_problems, retention_problems
from higgs_pipeline.training.candidates import steps_to_drop

BASE = Scores(
    audio_loss=3.0,
    wer=0.10,
    cer=0.05,
    speaker_similarity=0.80,
    dnsmos_ovrl=3.2,
    silence_rate=0.0,
    unfinished_rate=0.0,
)


def _like_base(**changes) -> Scores:
    return Scores(**{**BASE.__dict__, **changes})


def test_a_silent_candidate_with_the_lowest_loss_is_never_chosen():
    silent = _like_base(audio_loss=0.0028, wer=1.0, cer=1.0, silence_rate=1.0, dnsmos_ovrl=1.2)
    good = _like_base(audio_loss=2.5, wer=0.09)
    choice = choose([(100, silent), (200, good)], BASE, Tolerances())
    assert choice.chosen == 200
    assert set(choice.collapsed) == {100} and "silent" in choice.collapsed[100]
    assert "unintelligible" in choice.collapsed[100]


def test_unfinished_takes_mark_a_candidate_collapsed():
    rambling = _like_base(audio_loss=2.0, unfinished_rate=0.5)
    assert any("unfinished" in reason for reason in collapse_reasons(rambling, BASE, Tolerances()))
    # Within tolerance, or a loss that does not beat the base: not collapsed.
    assert collapse_reasons(_like_base(audio_loss=2.0, unfinished_rate=0.1), BASE, Tolerances()) == []
    assert collapse_reasons(_like_base(audio_loss=3.5, silence_rate=1.0), BASE, Tolerances()) == []


def test_what_is_heard_comes_before_the_loss_then_the_earliest_step_on_a_tie():
    mumbling = _like_base(audio_loss=1.0, wer=0.14, speaker_similarity=0.70)  # similarity drop 0.10 > 0.05
    unnatural = _like_base(audio_loss=1.1, dnsmos_ovrl=2.7)  # DNSMOS drop 0.5 > 0.3
    early = _like_base(audio_loss=2.0)
    late = _like_base(audio_loss=2.0)
    choice = choose([(400, late), (300, unnatural), (100, mumbling), (200, early)], BASE, Tolerances())
    assert choice.chosen == 200
    assert set(choice.worse_than_base) == {100, 300} and choice.collapsed == {}
    assert "less like the reference" in choice.worse_than_base[100]
    assert "less natural" in choice.worse_than_base[300]
    # Loose tolerances: the lowest audio loss wins.
    loose = Tolerances(wer=1, similarity=1, dnsmos=5)
    assert choose([(400, late), (300, unnatural), (100, mumbling)], BASE, loose).chosen == 100


def test_when_every_candidate_sounds_worse_the_lowest_loss_goes_to_the_gate_and_all_collapsed_chooses_none():
    worse = [(10, _like_base(audio_loss=2.0, wer=0.5, silence_rate=0.0)), (20, _like_base(audio_loss=4.0, wer=0.6))]
    # Step 10 beats the base's loss and is unintelligible: collapsed. Step 20 does not beat it: only worse.
    choice = choose(worse, BASE, Tolerances())
    assert set(choice.collapsed) == {10} and choice.chosen == 20 and "loss gate decides" in choice.reason
    # A candidate worse by ear but below the base's loss goes before one above the base's loss.
    mumbling = _like_base(audio_loss=2.9, wer=0.5, silence_rate=0.0, speaker_similarity=0.5)
    assert choose([(5, mumbling), (20, worse[1][1])], BASE, Tolerances()).chosen == 20  # 5 collapsed (WER)
    muffled = _like_base(audio_loss=2.9, dnsmos_ovrl=2.0)
    picked = choose([(5, muffled), (20, worse[1][1])], BASE, Tolerances())
    assert picked.chosen == 5 and "quality gate decides" in picked.reason
    silent = _like_base(audio_loss=1.0, silence_rate=1.0, wer=1.0)
    everything = choose([(10, silent), (20, silent)], BASE, Tolerances())
    assert everything.chosen is None and set(everything.collapsed) == {10, 20}
    with pytest.raises(ValueError, match="no candidate"):
        choose([], BASE, Tolerances())


def test_nan_numbers_are_not_evidence_either_way():
    unheard = _like_base(audio_loss=2.0, wer=math.nan, silence_rate=math.nan, unfinished_rate=math.nan)
    assert collapse_reasons(unheard, BASE, Tolerances()) == []
    nan_loss = _like_base(audio_loss=math.nan)
    assert choose([(10, nan_loss), (20, _like_base(audio_loss=2.9))], BASE, Tolerances()).chosen == 20


def test_retention_and_collapse_block_promotion_on_a_released_base_only():
    losses = {"val_audio_loss": 2.0, "base_val_audio_loss": 3.0, "val_wer": 0.1, "base_val_wer": 0.1}
    forgot = losses | {
        "retention_wer": 0.40,
        "base_retention_wer": 0.10,
        "retention_speaker_similarity": 0.60,
        "base_retention_speaker_similarity": 0.75,
    }
    problems = retention_problems(forgot)
    assert len(problems) == 2 and "retention_wer 0.4000 > base_retention_wer 0.1000" in problems[0]
    assert retention_problems(forgot | {"retention_wer_tolerance": 0.5, "retention_similarity_tolerance": 0.5}) == []
    assert retention_problems(losses) == []  # not scored: nothing to say
    assert len(promotion_blockers(forgot | {"demo_model": False})) == 2
    assert promotion_blockers(forgot | {"demo_model": True}) == []
    collapsed = losses | {"all_candidates_collapsed": True, "collapsed_steps": "20, 40"}
    assert "20, 40" in promotion_blockers(collapsed)[0]
    assert promotion_blockers(collapsed | {"demo_model": True}) == []
    assert quality_problems(losses | {"val_dnsmos_ovrl": 2.0, "base_val_dnsmos_ovrl": 3.0})[0].startswith(
        "adapter's speech sounds less natural: val_dnsmos_ovrl 2.0000 < base_val_dnsmos_ovrl 3.0000 - tolerance"
    )


def test_candidate_thinning_keeps_the_best_the_newest_and_an_even_spread():
    assert steps_to_drop([20, 40], best_step=20, keep=4) == []
    # Six evaluation points, keep 3 beside the best (step 40): the earliest and the newest stay, the middle thins.
    dropped = steps_to_drop([20, 40, 60, 80, 100, 120], best_step=40, keep=3)
    kept = sorted(set([20, 40, 60, 80, 100, 120]) - set(dropped))
    assert 40 in kept and 120 in kept and len(kept) == 4
    assert kept == [20, 40, 60, 120]
    assert steps_to_drop([20, 40, 60], best_step=None, keep=1) == [20, 40]
    assert steps_to_drop([20, 40, 60], best_step=40, keep=0) == [20, 60]
    with pytest.raises(ValueError, match="keep_candidates"):
        steps_to_drop([20], best_step=None, keep=-1)
