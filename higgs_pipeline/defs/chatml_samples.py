"""chatml_samples: transcript_check's accepted rows -> canonical speakers -> TTS and voice-cloning samples in
boson_multimodal ChatML."""

from collections import Counter

import dagster as dg
import fsspec
from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

from higgs_pipeline.data.chatml import (
    VOICE_CLONE_START_INDEX,
    check_kinds,
    clip_table,
    plan_samples,
    sample_records,
)
from higgs_pipeline.data.hashing import digest, digest_of_lines
from higgs_pipeline.data.records import SAMPLE_KINDS, read_records, write_records
from higgs_pipeline.data.speakers import normalize_speakers
from higgs_pipeline.data.tables import read_parquet, write_parquet
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.models.loading import load_text_tokenizer


class ChatmlSamplesConfig(dg.Config):
    kinds: list[str] = list(SAMPLE_KINDS)
    case_sensitive_speakers: bool = False


@dg.asset(group_name="data_prep", code_version="1", deps=["transcript_check"], kinds={"pandas"})
def chatml_samples(
    context: dg.AssetExecutionContext, config: ChatmlSamplesConfig, artifacts: ArtifactStore
) -> dg.MaterializeResult:
    """Speaker-normalized samples: one TTS sample per accepted row and one voice-cloning sample per row that has
    a reference (its own, or another clip of the same speaker). Writes the records (JSONL) for training, plus a
    sample index and a clip table (Parquet) for the next assets, and the speaker map (JSON)."""
    try:
        kinds = check_kinds(config.kinds)
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    manifest = upstream_metadata(context, "transcript_check")  # raw_audio_manifest's rows, transcripts checked
    accepted = read_parquet(manifest["accepted_path"])
    if accepted.empty:
        raise dg.Failure(
            f"transcript_check accepted no rows ({manifest['rows_rejected']} rejected: see "
            f"{manifest['rejected_path']}; raw_audio_manifest's own rejections are in its rejected file): "
            "nothing to build samples from"
        )
    speaker_ids, speaker_map = normalize_speakers(accepted["speaker"], config.case_sensitive_speakers)
    plan = plan_samples(accepted, speaker_ids, kinds)
    if plan.empty:
        raise dg.Failure(
            f"chatml_samples built no samples from {len(accepted)} accepted rows with kinds {list(kinds)}: "
            "voice_clone needs a speaker with two or more distinct clips (or a ref_audio_path); add 'tts' to kinds"
        )
    clips = clip_table(accepted, plan)

    version = digest(manifest["accepted_path"], manifest["data_version"], config.model_dump_json())[:16]
    folder = artifacts.path("chatml_samples", version)
    fs, _ = fsspec.core.url_to_fs(folder)
    fs.makedirs(folder, exist_ok=True)
    paths = {name: f"{folder}/{name}" for name in ("samples.jsonl", "samples_index.parquet", "clips.parquet")}
    speaker_map_path = f"{folder}/speaker_map.json"
    written = write_records(paths["samples.jsonl"], sample_records(plan))
    write_parquet(plan[["sample_id", "kind", "speaker", "clip_hash", "ref_clip_hash"]], paths["samples_index.parquet"])
    write_parquet(clips, paths["clips.parquet"])
    speaker_map.write(speaker_map_path)

    per_kind = Counter(plan["kind"])
    cloned = set(plan.loc[plan["kind"] == "voice_clone", "speaker"])
    context.log.info(
        f"{written} samples ({dict(per_kind)}) from {len(accepted)} rows, {len(speaker_map.speakers)} speakers"
    )
    return dg.MaterializeResult(
        metadata={
            "samples": written,
            "speakers": len(speaker_map.speakers),
            **{f"samples_{kind}": int(per_kind.get(kind, 0)) for kind in SAMPLE_KINDS},
            "speakers_tts_only": len(set(speaker_map.speakers) - cloned) if "voice_clone" in kinds else 0,
            "clips": len(clips),
            "speaker_map": dg.MetadataValue.md(speaker_map.markdown()),
            "case_sensitive_speakers": config.case_sensitive_speakers,
            "samples_path": paths["samples.jsonl"],
            "samples_index_path": paths["samples_index.parquet"],
            "clips_path": paths["clips.parquet"],
            "speaker_map_path": speaker_map_path,
            "data_version": manifest["data_version"],
        },
        data_version=dg.DataVersion(digest_of_lines(plan["sample_id"], seed=version.encode())),
    )


@dg.asset_check(asset=chatml_samples, blocking=True)
def chatml_samples_tokenize(
    context: dg.AssetCheckExecutionContext, checkpoints: HiggsCheckpoints
) -> dg.AssetCheckResult:
    """Every sample goes through boson_multimodal's prepare_chatml_sample with the model's text tokenizer, has
    one clip per audio content, a unique id, and (voice cloning) a reference that is not its target."""
    meta = upstream_metadata(context, "chatml_samples")
    tokenizer = load_text_tokenizer(checkpoints.model)
    problems: list[str] = []
    seen: set[str] = set()
    checked = 0
    for record in read_records(meta["samples_path"]):
        checked += 1
        problem = _sample_problem(record, tokenizer, seen)
        if problem:
            problems.append(f"{record.sample_id}: {problem}")
    return dg.AssetCheckResult(
        passed=not problems and checked == int(meta["samples"]),
        metadata={
            "samples_checked": checked,
            "samples_failed": len(problems),
            "examples": "; ".join(problems[:10]) or "none",
        },
    )


def _sample_problem(record, tokenizer, seen: set[str]) -> str:
    if record.sample_id in seen:
        return "duplicate sample_id"
    seen.add(record.sample_id)
    chatml = record.to_chatml()
    input_tokens, _, audio_contents, _ = prepare_chatml_sample(chatml, tokenizer)
    if input_tokens is None:
        return "prepare_chatml_sample could not tokenize it"
    if len(audio_contents) != len(record.audio):
        return f"{len(audio_contents)} audio contents but {len(record.audio)} clips"
    # The collator gives each audio token a clip in order: one more in the text (a transcript holding
    # <|AUDIO_OUT|>) shifts every clip after it and fails training.
    audio_tokens = {tokenizer.convert_tokens_to_ids(token) for token in ("<|AUDIO|>", "<|AUDIO_OUT|>")}
    slots = sum(token in audio_tokens for token in input_tokens)
    if slots != len(record.audio):
        return f"{slots} audio tokens in the tokenized text but {len(record.audio)} clips"
    if record.kind == "voice_clone":
        if chatml.start_index != VOICE_CLONE_START_INDEX or len(record.audio) != 2:
            return "voice_clone sample is not [system, user, reference, user, target] with start_index=3"
        if record.audio[0]["clip_hash"] == record.audio[1]["clip_hash"]:
            return "reference clip is the target clip"
    return ""
