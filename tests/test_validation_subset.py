"""The validation subset training measures: at most `max_validation_samples`, chosen by hash, and stable when data
is added (data/split.py `validation_subset`)."""

from __future__ import annotations

import numpy as np
import pytest

from higgs_pipeline.data.split import ids_sha256, validation_subset, validation_subset_records
from higgs_pipeline.training.config import profile


def _ids(start: int, stop: int) -> list[str]:
    return [f"sample-{index:07d}" for index in range(start, stop)]


def _subset(ids: list[str], limit: int) -> set[str]:
    return set(np.asarray(ids)[validation_subset(ids, limit)])


def test_the_subset_is_bounded_and_keeps_every_old_member_when_ten_percent_is_added():
    corpus = _ids(0, 3_000)
    grown = corpus + _ids(3_000, 3_300)  # 10% new samples
    before, after = _subset(corpus, 2_000), _subset(grown, 2_000)
    assert 1_000 <= len(before) <= 2_000 and len(after) <= 2_000
    assert before <= after  # every old member stays
    assert after - before <= set(_ids(3_000, 3_300))  # only new samples join
    assert _subset(list(reversed(grown)), 2_000) == after  # the order of the split does not matter


def test_growth_never_lets_an_old_outsider_in_and_never_passes_the_limit():
    """Over many additions the count stays within the limit; when it must halve, the survivors were members."""
    members: set[str] = set()
    for size in range(500, 20_001, 1_500):
        ids = _ids(0, size)
        chosen = _subset(ids, 700)
        assert 0 < len(chosen) <= 700
        old = set(_ids(0, size - 1_500)) if size > 500 else set()
        assert chosen & old <= members, "an old sample that was not a member joined"
        members = chosen


def test_a_tiny_limit_never_gives_an_empty_subset():
    """One halving can empty a subset of one or two (hashes that bunch): it then holds the smallest hash's id."""
    for trial in range(300):
        ids = _ids(trial * 100, trial * 100 + 2 + trial % 20)
        for limit in (1, 2, 5):
            assert 1 <= len(_subset(ids, limit)) <= limit


def test_zero_or_a_limit_above_the_split_keeps_everything():
    ids = _ids(0, 50)
    assert validation_subset(ids, 0).all() and validation_subset(ids, 50).all()
    assert validation_subset(ids, 10).sum() <= 10
    with pytest.raises(ValueError, match="max_validation_samples"):
        validation_subset(ids, -1)


def test_records_keep_their_order_and_the_ids_hash_ignores_order():
    class Record:
        def __init__(self, sample_id: str):
            self.sample_id = sample_id

    records = [Record(sample_id) for sample_id in _ids(0, 40)]
    kept = validation_subset_records(records, 16)
    assert [r.sample_id for r in kept] == sorted(r.sample_id for r in kept) and len(kept) <= 16
    assert ids_sha256(["b", "a"]) == ids_sha256(["a", "b"]) != ids_sha256(["a"])


def test_the_setting_defaults_to_2000_and_refuses_a_negative_count():
    assert profile("8xgpu").run.max_validation_samples == 2000
    assert profile("demo", {"max_validation_samples": "0"}).run.max_validation_samples == 0
    with pytest.raises(ValueError, match="run.max_validation_samples must be 0"):
        profile("demo", {"max_validation_samples": "-1"})


def test_the_evaluation_measures_the_subset_its_training_measured():
    """adapter_evaluation reads the limit from lora_adapter's recorded training config: a config from before the
    setting validated on the whole split; with no config recorded, the default."""
    from higgs_pipeline.defs.adapter_evaluation import training_validation_limit

    recorded = {"training_config": profile("demo", {"max_validation_samples": "16"}).to_dict()}
    assert training_validation_limit(recorded) == 16
    assert training_validation_limit({"training_config": {"run": {"eval_every": 20}}}) == 0
    assert training_validation_limit({}) == 2000


def test_a_recorded_loss_is_reused_only_when_measured_on_the_same_samples_in_the_same_precision():
    """The gate compares a candidate's loss with the base's: a record is reused only in the precision the
    evaluation measures the base in, and on the same samples; a line from before precisions were recorded is
    measured again."""
    from higgs_pipeline.evaluation.hearing import recorded_losses

    ids = ids_sha256(_ids(0, 3))
    sums = [2.0, 1.0, 4.0, 3.0, 1.0, 4.0]  # text loss sum, correct, count; one codebook: loss, correct, count
    line = {"val_ids_sha256": ids, "val_sums": sums, "val_precision": "fp32"}
    means = recorded_losses(line, ids)
    assert means is not None and means["text_loss"] == pytest.approx(0.5) and means["audio_loss"] == pytest.approx(0.75)
    assert recorded_losses({**line, "val_precision": "bf16"}, ids) is None
    assert recorded_losses({**line, "val_precision": "bf16"}, ids, "bf16") == means
    assert recorded_losses(line, ids, "bf16") is None
    assert recorded_losses({key: value for key, value in line.items() if key != "val_precision"}, ids) is None
    assert recorded_losses(line, ids_sha256(_ids(0, 4))) is None


def test_losses_are_measured_in_the_precision_every_candidate_recorded_else_fp32():
    """A bf16 training run's records are all reused (the base then measured in bf16 too); records in mixed
    precisions, on other samples, or none, leave the evaluation in fp32."""
    from types import SimpleNamespace

    from higgs_pipeline.evaluation.hearing import loss_precision

    ids = ids_sha256(_ids(0, 3))

    def candidate(precision: str | None, ids_hash: str = ids):
        line = {"val_ids_sha256": ids_hash, "val_sums": [1.0] * 6}
        return SimpleNamespace(validation=line | ({"val_precision": precision} if precision else {}))

    assert loss_precision([candidate("bf16"), candidate("bf16")], ids) == "bf16"
    assert loss_precision([candidate("fp32"), candidate("fp32")], ids) == "fp32"
    assert loss_precision([candidate("bf16"), candidate("fp32")], ids) == "fp32"
    assert loss_precision([candidate("bf16"), candidate("bf16", ids_sha256(_ids(0, 4)))], ids) == "bf16"
    assert loss_precision([candidate("fp16")], ids) == loss_precision([candidate(None)], ids) == "fp32"
    assert loss_precision([], ids) == "fp32"
