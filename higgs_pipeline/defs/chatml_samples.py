"""chatml_samples: transcript_check's accepted rows -> canonical speakers -> TTS and voice-cloning samples in
boson_multimodal ChatML."""

import itertools
from collections import Counter

import dagster as dg
import fsspec
import pandas as pd
from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample
from pydantic import Field

from higgs_pipeline.data.chatml import (
    VOICE_CLONE_START_INDEX,
    check_kinds,
    clip_table,
    plan_samples,
    sample_records,
)
from higgs_pipeline.data.dialogue import (
    DIALOGUE_KIND,
    DialoguePlan,
    TokenCounter,
    dialogue_rows,
    plan_dialogues,
    recorded_dialogue,
)
from higgs_pipeline.data.hashing import digest, digest_of_lines
from higgs_pipeline.data.records import SAMPLE_KINDS, read_records, write_records
from higgs_pipeline.data.speakers import normalize_speakers
from higgs_pipeline.data.tables import read_parquet, write_parquet
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.models.loading import load_text_tokenizer

# The samples index: every sample's kind, speaker, target clip (a dialogue's first turn), reference clip, and for
# dialogue samples the dialogue and its speakers (the split keeps a dialogue on one side by these).
INDEX_COLUMNS = ("sample_id", "kind", "speaker", "clip_hash", "ref_clip_hash", "dialogue_id", "speakers")


class ChatmlSamplesConfig(dg.Config):
    """Which kinds of training samples to build, and how speakers and dialogues are handled."""

    kinds: list[str] = Field(
        default=list(SAMPLE_KINDS),
        description=f"Sample kinds to build, any of {list(SAMPLE_KINDS)}: plain text-to-speech, voice cloning "
        "(a reference clip of the same speaker first) and multi-speaker dialogues.",
    )
    case_sensitive_speakers: bool = Field(
        default=False, description="Treat speaker labels differing only in case ('Alice', 'alice') as two speakers."
    )
    dialogue_references: bool = Field(
        default=True,
        description="Give each dialogue speaker a reference clip from outside the dialogue (boson's multi-speaker "
        "voice-clone layout).",
    )
    max_dialogue_tokens: int = Field(
        default=4096,
        description="Longest dialogue sample (text tokens + audio frames); a longer dialogue is cut at turn "
        "boundaries into windows.",
    )


@dg.asset(group_name="data_prep", code_version="1", deps=["transcript_check"], kinds={"pandas"})
def chatml_samples(
    context: dg.AssetExecutionContext,
    config: ChatmlSamplesConfig,
    artifacts: ArtifactStore,
    checkpoints: HiggsCheckpoints,
) -> dg.MaterializeResult:
    """Speaker-normalized samples: one TTS sample per accepted row and one voice-cloning sample per row that has
    a reference (its own, or another clip of the same speaker); rows sharing a dialogue_id are one dialogue
    sample instead (or several windows of one, cut at turn boundaries to fit max_dialogue_tokens). Writes the
    records (JSONL) for training, plus a sample index and a clip table (Parquet) for the next assets, and the
    speaker map (JSON)."""
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
    single = ~dialogue_rows(accepted)
    plan = plan_samples(accepted[single].reset_index(drop=True), speaker_ids[single].reset_index(drop=True), kinds)
    dialogues = _plan_dialogues(accepted, speaker_ids, speaker_map, config, checkpoints)
    if plan.empty and not dialogues.samples:
        raise dg.Failure(
            f"chatml_samples built no samples from {len(accepted)} accepted rows with kinds {list(kinds)}: "
            "voice_clone needs a speaker with two or more distinct clips (or a ref_audio_path); add 'tts' to kinds"
        )
    index = pd.concat([plan[list(INDEX_COLUMNS[:5])], pd.DataFrame(s.index_row() for s in dialogues.samples)])
    index = index.reindex(columns=list(INDEX_COLUMNS), fill_value="").fillna("").reset_index(drop=True)
    turn_clips = pd.DataFrame({"clip_hash": sorted(dialogues.clip_hashes()), "ref_clip_hash": ""})
    clips = clip_table(accepted, pd.concat([index[["clip_hash", "ref_clip_hash"]], turn_clips]))

    version = digest(manifest["accepted_path"], manifest["corpus_version"], config.model_dump_json())[:16]
    folder = artifacts.path("chatml_samples", version)
    fs, _ = fsspec.core.url_to_fs(folder)
    fs.makedirs(folder, exist_ok=True)
    paths = {name: f"{folder}/{name}" for name in ("samples.jsonl", "samples_index.parquet", "clips.parquet")}
    speaker_map_path = f"{folder}/speaker_map.json"
    records = itertools.chain(sample_records(plan), (sample.record() for sample in dialogues.samples))
    written = write_records(paths["samples.jsonl"], records)
    write_parquet(index, paths["samples_index.parquet"])
    write_parquet(clips, paths["clips.parquet"])
    speaker_map.write(speaker_map_path)

    per_kind = Counter(index["kind"])
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
            **dialogues.metadata(),
            "clips": len(clips),
            "speaker_map": dg.MetadataValue.md(speaker_map.markdown()),
            "case_sensitive_speakers": config.case_sensitive_speakers,
            "samples_path": paths["samples.jsonl"],
            "samples_index_path": paths["samples_index.parquet"],
            "clips_path": paths["clips.parquet"],
            "speaker_map_path": speaker_map_path,
            "corpus_version": manifest["corpus_version"],
        },
        data_version=dg.DataVersion(digest_of_lines(index["sample_id"], seed=version.encode())),
    )


def _plan_dialogues(accepted, speaker_ids, speaker_map, config: ChatmlSamplesConfig, checkpoints) -> DialoguePlan:
    """The dialogue samples; the text tokenizer is loaded only when there are dialogues to measure."""
    if config.max_dialogue_tokens < 0:
        raise dg.Failure(f"max_dialogue_tokens must be 0 (no limit) or positive, got {config.max_dialogue_tokens}")
    names = {speaker_id: entry["name"] for speaker_id, entry in speaker_map.speakers.items()}
    member = dialogue_rows(accepted)
    counter = None
    if member.any() and config.max_dialogue_tokens:
        counter = TokenCounter(load_text_tokenizer(checkpoints.model))
    return plan_dialogues(accepted, speaker_ids, names, config.dialogue_references, config.max_dialogue_tokens, counter)


@dg.asset_check(asset=chatml_samples, blocking=True)
def chatml_samples_are_well_formed(
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
    if record.kind == DIALOGUE_KIND:
        try:
            dialogue = recorded_dialogue(record)
        except ValueError as error:
            return str(error)
        if not dialogue.turns:
            return "dialogue sample without turns"
    return ""
