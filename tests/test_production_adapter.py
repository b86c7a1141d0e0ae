"""production_adapter moves its pointer only to a checked, better adapter, and records what it points at.

The evaluations it reads are recorded in a real Dagster instance as materializations of adapter_evaluation
(the numbers are chosen here; how they are measured is test_adapter_evaluation's subject).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from higgs_pipeline.defs.production_adapter import production_adapter, read_pointer, should_promote
from higgs_pipeline.defs.resources import ArtifactStore
from higgs_pipeline.serving.adapters import ADAPTER_FILES, adapter_sha256


def _evaluation(
    adapter: str,
    total: float,
    base_total: float = 10.0,
    corpus_version: str = "data-v1",
    audio: float | None = None,
    base_audio: float | None = None,
    demo: bool = True,
    quality: dict | None = None,
    code_version: str = "5",
    precision: str | None = None,
) -> dict:
    """An evaluation's metadata; audio losses default to half the totals, quality numbers to none (not listened).
    The adapter folder is made here (under the test's working folder) and its files' hash recorded, as the
    evaluation records what it heard."""
    folder = Path(adapter)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        (folder / name).write_text(f"{name} of {adapter}")
    audio = total / 2 if audio is None else audio
    base_audio = base_total / 2 if base_audio is None else base_audio
    numbers = {"val_total_loss": total, "val_text_loss": total - audio, "val_audio_loss": audio}
    numbers |= {"base_val_total_loss": base_total, "base_val_audio_loss": base_audio, "improvement": base_total - total}
    numbers |= quality or {}
    return {
        **{name: dg.MetadataValue.float(value) for name, value in numbers.items()},
        "adapter_path": dg.MetadataValue.path(adapter),
        "adapter_sha256": adapter_sha256(adapter),
        "corpus_version": corpus_version,
        "base_model": "demo" if demo else "bosonai/higgs-audio-v2-generation-3B-base",
        "demo_model": demo,
        "report_path": dg.MetadataValue.path(f"{adapter}/report.html"),
        "code_version": code_version,
        **({"val_losses_precision": precision} if precision else {}),
    }


def _quality(wer: float, base_wer: float, similarity: float = 0.8, base_similarity: float = 0.8) -> dict:
    return {
        "val_wer": wer,
        "val_cer": wer / 2,
        "val_speaker_similarity": similarity,
        "base_val_wer": base_wer,
        "base_val_cer": base_wer / 2,
        "base_val_speaker_similarity": base_similarity,
        "ground_truth_wer": 0.02,
        "ground_truth_speaker_similarity": 0.9,
        "val_unfinished_rate": 0.0,
        "val_silence_rate": 0.0,
        "quality_wer_tolerance": 0.05,
        "quality_similarity_tolerance": 0.05,
    }


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Adapter folders are relative paths: made under each test's own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def promote(artifacts_dir):
    """Records an evaluation, materializes production_adapter, returns (its metadata or None, the pointer)."""
    with dg.instance_for_test() as instance:

        def run(evaluation: dict):
            instance.report_runless_asset_event(dg.AssetMaterialization("adapter_evaluation", metadata=evaluation))
            result = dg.materialize(
                [production_adapter],
                instance=instance,
                resources={"artifacts": ArtifactStore(root=str(artifacts_dir))},
                raise_on_error=False,
            )
            events = result.asset_materializations_for_node("production_adapter")
            metadata = None
            if events:
                metadata = {k: v.value for k, v in events[0].metadata.items()}
                metadata["dagster/data_version"] = events[0].tags["dagster/data_version"]
            return metadata, read_pointer(str(artifacts_dir / "production_adapter" / "current.json")), result

        run.instance = instance
        yield run


def test_first_adapter_is_promoted_with_its_numbers(promote):
    metadata, pointer, _ = promote(_evaluation("adapters/a", 8.0))
    assert metadata["promoted"] is True and metadata["reason"] == "first promotion"
    assert pointer["adapter_path"] == metadata["adapter_path"] == "adapters/a"
    assert pointer["val_total_loss"] == metadata["val_total_loss"] == 8.0
    assert pointer["corpus_version"] == metadata["corpus_version"] == "data-v1"
    assert pointer["improvement"] == 2.0 and pointer["previous_adapter_path"] is None


def test_pointer_moves_only_for_a_better_adapter_on_the_same_data(promote):
    first, _, _ = promote(_evaluation("adapters/a", 8.0))
    worse, pointer, _ = promote(_evaluation("adapters/b", 9.0))
    assert worse["promoted"] is False and pointer["adapter_path"] == "adapters/a"
    assert worse["candidate_adapter_path"] == "adapters/b" and worse["candidate_val_total_loss"] == 9.0
    # Kept pointer, same data version of the asset: nothing downstream sees a change.
    assert worse["dagster/data_version"] == first["dagster/data_version"]
    better, pointer, _ = promote(_evaluation("adapters/c", 7.5))
    assert better["promoted"] is True and pointer["adapter_path"] == "adapters/c"
    assert pointer["previous_adapter_path"] == "adapters/a"
    assert better["dagster/data_version"] != first["dagster/data_version"]


def test_new_corpus_version_promotes_the_checked_adapter(promote):
    promote(_evaluation("adapters/a", 5.0))
    # On new data the validation split differs: 6.0 there says nothing against 5.0 on the old split.
    metadata, pointer, _ = promote(_evaluation("adapters/d", 6.0, corpus_version="data-v2"))
    assert metadata["promoted"] is True and pointer["adapter_path"] == "adapters/d"
    assert pointer["corpus_version"] == "data-v2"


def test_another_evaluation_code_promotes_the_checked_adapter(promote):
    """DNSMOS's windows moved its numbers (adapter_evaluation's code version 5): an evaluation by other code is not
    compared with the current one's numbers, as on new data; one by the same code is."""
    promote(_evaluation("adapters/a", 5.0, code_version="4"))
    same, _, _ = promote(_evaluation("adapters/b", 6.0, code_version="4"))
    assert same["promoted"] is False
    metadata, pointer, _ = promote(_evaluation("adapters/d", 6.0, code_version="5"))
    assert metadata["promoted"] is True and "evaluation code" in metadata["reason"]
    assert pointer["evaluation_code_version"] == "5"


def test_losses_measured_in_another_precision_are_not_compared(promote):
    """A bf16 training run's evaluation measures its losses in bf16: they are not ranked against a pointer's fp32
    numbers (an evaluation from before precisions were recorded is fp32), only against other bf16 ones."""
    promote(_evaluation("adapters/a", 5.0))
    metadata, pointer, _ = promote(_evaluation("adapters/b", 6.0, precision="bf16"))
    assert metadata["promoted"] is True and "not heard against it" in metadata["reason"]  # the demo: never heard
    assert "not compared" in metadata["reason"]
    assert pointer["val_losses_precision"] == "bf16"
    worse, pointer, _ = promote(_evaluation("adapters/c", 7.0, precision="bf16"))
    assert worse["promoted"] is False and pointer["adapter_path"] == "adapters/b"


def test_a_candidate_that_sounds_worse_is_kept_out_whatever_its_loss_precision():
    """Listening compares across precisions (WER and similarity do not depend on how the losses were measured)."""
    current = {"adapter_path": "a", "val_audio_loss": 5.0, "val_wer": 0.05, "val_speaker_similarity": 0.9}
    current |= {"corpus_version": "v", "base_model": "b", "evaluation_code_version": "5"}
    worse = current | {"adapter_path": "b", "val_audio_loss": 1.0, "val_wer": 0.6, "val_losses_precision": "bf16"}
    worse |= {"quality_wer_tolerance": 0.05, "quality_similarity_tolerance": 0.05}
    promote, reason = should_promote(current, worse)
    assert promote is False and "intelligible" in reason


def _failure(result) -> str:
    return result.get_step_failure_events()[0].step_failure_data.error.message


def test_evaluation_that_fails_the_gate_is_never_promoted(promote):
    promote(_evaluation("adapters/a", 8.0))
    metadata, pointer, result = promote(_evaluation("adapters/bad", 11.0, base_total=10.0))
    assert metadata is None and not result.success
    assert pointer["adapter_path"] == "adapters/a"
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "worse than its base model" in failure
    _, pointer, result = promote(_evaluation("adapters/nan", float("nan")))
    assert not result.success and pointer["adapter_path"] == "adapters/a"


def test_better_total_loss_does_not_promote_worse_audio(promote):
    """The demo chain's case: structural text tokens pulled the total down while the audio got worse."""
    promote(_evaluation("adapters/a", 8.0))
    worse_audio = _evaluation("adapters/text_only", 12.05, base_total=13.66, audio=6.9509, base_audio=6.9484)
    metadata, pointer, result = promote(worse_audio)
    assert metadata is None and not result.success and pointer["adapter_path"] == "adapters/a"
    assert "val_audio_loss 6.9509 > base_val_audio_loss 6.9484" in _failure(result)


def test_same_data_promotes_on_audio_loss_not_total(promote):
    promote(_evaluation("adapters/a", 8.0, audio=4.0))
    # Lower total, higher audio loss than the adapter in production: kept.
    kept, pointer, _ = promote(_evaluation("adapters/b", 7.0, audio=4.5))
    assert kept["promoted"] is False and "val_audio_loss 4.5000 is not below current 4.0000" in kept["reason"]
    assert kept["candidate_val_audio_loss"] == 4.5 and pointer["adapter_path"] == "adapters/a"
    better, pointer, _ = promote(_evaluation("adapters/c", 9.0, audio=3.5))
    assert better["promoted"] is True and pointer["adapter_path"] == "adapters/c"


def test_released_model_adapter_that_sounds_worse_than_its_base_is_blocked(promote):
    """Better losses, but WER beyond the tolerance above the base's (or similarity below it): never promoted."""
    promote(_evaluation("adapters/a", 8.0, demo=False, quality=_quality(0.05, 0.06)))
    metadata, pointer, result = promote(_evaluation("adapters/mumbles", 7.0, demo=False, quality=_quality(0.2, 0.1)))
    assert metadata is None and not result.success and pointer["adapter_path"] == "adapters/a"
    assert "val_wer 0.2000 > base_val_wer 0.1000 + tolerance 0.05" in _failure(result)
    stranger = _quality(0.05, 0.05, similarity=0.6, base_similarity=0.7)
    _, pointer, result = promote(_evaluation("adapters/stranger", 7.0, demo=False, quality=stranger))
    assert not result.success and pointer["adapter_path"] == "adapters/a"
    assert "val_speaker_similarity 0.6000 < base_val_speaker_similarity 0.7000" in _failure(result)
    # Within the tolerance: promoted.
    metadata, pointer, _ = promote(_evaluation("adapters/b", 7.0, demo=False, quality=_quality(0.09, 0.06)))
    assert metadata["promoted"] is True and pointer["adapter_path"] == "adapters/b"


def test_released_model_evaluation_that_did_not_listen_is_blocked(promote):
    _, pointer, result = promote(_evaluation("adapters/deaf", 7.0, demo=False))
    assert not result.success and pointer is None
    assert "no word error rate was measured" in _failure(result)


def test_demo_model_quality_only_warns(promote):
    """The same numbers that block on a released model promote on the demo (its audio is noise), with a warning."""
    metadata, pointer, result = promote(_evaluation("adapters/noise", 7.0, demo=True, quality=_quality(0.9, 0.5)))
    assert result.success and metadata["promoted"] is True and pointer["adapter_path"] == "adapters/noise"
    logs = promote.instance.all_logs(result.run_id)
    warnings = [entry.user_message for entry in logs if "not enforced" in entry.user_message]
    assert len(warnings) == 1 and "random weights" in warnings[0] and "val_wer 0.9000" in warnings[0], warnings


def test_pointer_records_the_audio_and_quality_numbers(promote):
    metadata, pointer, _ = promote(_evaluation("adapters/a", 8.0, demo=False, quality=_quality(0.1, 0.12, 0.7, 0.69)))
    for name, value in _quality(0.1, 0.12, 0.7, 0.69).items():
        assert pointer[name] == metadata[name] == value, name
    assert pointer["base_val_audio_loss"] == 5.0 and pointer["report_path"] == "adapters/a/report.html"
    # A released adapter whose WER is worse than the one in production beyond the tolerance is kept out,
    # whatever its loss (it still beat its own base).
    worse, pointer, _ = promote(_evaluation("adapters/b", 6.0, demo=False, quality=_quality(0.2, 0.2, 0.7, 0.69)))
    assert worse["promoted"] is False and pointer["adapter_path"] == "adapters/a"
    assert "current adapter's val_wer 0.1000" in worse["reason"]


def test_released_model_blocks_forgotten_voices_and_all_collapsed_candidates(promote):
    """The retention set and the collapse flag gate promotion on a released base, like the listening numbers; the
    pointer names the chosen candidate with its step and naturalness."""
    heard = _quality(0.05, 0.05) | {"val_dnsmos_ovrl": 3.1, "base_val_dnsmos_ovrl": 3.2, "chosen_step": 40.0}
    metadata, pointer, _ = promote(_evaluation("run/candidates/step-00000040", 8.0, demo=False, quality=heard))
    assert metadata["promoted"] is True and pointer["chosen_step"] == 40.0 and pointer["val_dnsmos_ovrl"] == 3.1
    forgot = heard | {"retention_wer": 0.5, "base_retention_wer": 0.1}
    _, pointer, result = promote(_evaluation("adapters/forgot", 7.0, demo=False, quality=forgot))
    assert not result.success and pointer["adapter_path"] == "run/candidates/step-00000040"
    assert "retention_wer 0.5000 > base_retention_wer 0.1000" in _failure(result)
    collapsed = heard | {"all_candidates_collapsed": 1.0}
    _, pointer, result = promote(_evaluation("adapters/silent", 7.0, demo=False, quality=collapsed))
    assert not result.success and "every candidate adapter collapsed" in _failure(result)
    unnatural = heard | {"val_dnsmos_ovrl": 2.0}
    _, _, result = promote(_evaluation("adapters/buzzing", 7.0, demo=False, quality=unnatural))
    assert not result.success and "val_dnsmos_ovrl 2.0000 < base_val_dnsmos_ovrl 3.2000" in _failure(result)


def test_only_the_very_files_that_were_heard_are_promoted(promote):
    """The adapter's files changed after the evaluation heard them (or it recorded no hash): refused, naming the
    folder and both hashes; the pointer stays, and records the hash of what it names."""
    first, pointer, _ = promote(_evaluation("adapters/a", 8.0))
    assert pointer["adapter_sha256"] == first["adapter_sha256"] == adapter_sha256("adapters/a")
    heard = _evaluation("adapters/b", 7.0)
    Path("adapters/b/adapter_model.safetensors").write_text("other weights")
    _, pointer, result = promote(heard)
    assert not result.success and pointer["adapter_path"] == "adapters/a"
    message = _failure(result)
    assert "adapters/b" in message and adapter_sha256("adapters/b") in message
    assert heard["adapter_sha256"] in message and "changed since they were heard" in message
    unrecorded = {name: value for name, value in _evaluation("adapters/c", 7.0).items() if name != "adapter_sha256"}
    _, pointer, result = promote(unrecorded)
    assert not result.success and "recorded no adapter_sha256" in _failure(result)
    assert pointer["adapter_path"] == "adapters/a"
