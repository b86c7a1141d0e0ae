"""train_val_split: a hash-decided train/validation split of the samples, grouped by target clip, speaker or text."""

import json

import dagster as dg
import fsspec
import pandas as pd
from pydantic import Field

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.records import read_records, read_split
from higgs_pipeline.data.split import GROUP_COLUMNS, split_samples, target_text, text_keys, validation_texts_in_train
from higgs_pipeline.data.tables import read_parquet, write_parquet, write_text
from higgs_pipeline.data.token_store import TokenStore
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.upstream import upstream_metadata
from higgs_pipeline.models.loading import load_text_tokenizer

GROUP_BY = {"target_clip": "target_clip", "speaker": "speaker_held_out", "text": "text"}


class TrainValSplitConfig(dg.Config):
    """Which share of the samples is held out, and what is kept together on one side."""

    validation_fraction: float = Field(
        0.05, description="Share of the groups (by hash) that go to validation, between 0 and 1 (exclusive)"
    )
    group_by: str = Field(
        "target_clip",
        description="target_clip: a recording's samples stay together; speaker: validation speakers are unseen; "
        "text: no validation sentence is also trained on",
    )
    speaker_held_out: bool | None = Field(
        None, description="Not a setting any more: use group_by: speaker (setting this fails, saying so)"
    )

    def mode(self) -> str:
        if self.speaker_held_out is not None:
            raise ValueError("speaker_held_out is not a setting any more: use group_by: speaker instead")
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by '{self.group_by}': choose one of {sorted(GROUP_BY)}")
        return GROUP_BY[self.group_by]


@dg.asset(group_name="data_prep", code_version="1", deps=["chatml_samples", "tokenized_audio"], kinds={"pandas"})
def train_val_split(
    context: dg.AssetExecutionContext,
    config: TrainValSplitConfig,
    artifacts: ArtifactStore,
    checkpoints: HiggsCheckpoints,
) -> dg.MaterializeResult:
    """`split.json` of sample ids. A sample's side depends only on the hash of its group (target clip, speaker
    or normalized text), so adding data never moves an existing sample and a recording's TTS and voice-clone
    samples are never split apart. `validation_texts_in_train` counts validation samples whose text is trained
    on too (always 0 grouped by text). Beside it, `sample_lengths.parquet` (training/data.py LENGTH_COLUMNS):
    each sample's byte offset in samples.jsonl and the parts of its length (text tokens of the base model's
    tokenizer, audio frames from the token index), so training ranks neither parse nor tokenize the corpus."""
    samples = upstream_metadata(context, "chatml_samples")
    tokens = upstream_metadata(context, "tokenized_audio")
    if tokens.get("clips_path") != samples["clips_path"]:
        raise dg.Failure(
            "tokenized_audio was materialized for other samples than the latest chatml_samples: "
            "materialize tokenized_audio again (it only encodes the new clips)"
        )
    index = read_parquet(samples["samples_index_path"])
    index["text_key"] = _text_keys(samples["samples_path"], index["sample_id"])
    try:
        mode = config.mode()
        result = split_samples(index, config.validation_fraction, mode)
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    if result.note:
        context.log.warning(result.note)
    validation = index[result.is_validation]
    train = index[~result.is_validation]
    split = {"train": train["sample_id"].tolist(), "validation": validation["sample_id"].tolist()}

    version = digest(samples["samples_index_path"], mode, repr(config.validation_fraction))[:16]
    folder = artifacts.path("train_val_split", version)
    fs, _ = fsspec.core.url_to_fs(folder)
    fs.makedirs(folder, exist_ok=True)
    split_path = f"{folder}/split.json"
    write_text(json.dumps(split), split_path)
    lengths_path = f"{folder}/sample_lengths.parquet"
    from higgs_pipeline.training.data import sample_lengths  # here: it imports boson's collator and transformers

    store = TokenStore(tokens["token_store_root"], tokens["tokenizer"])
    try:
        lengths = sample_lengths(samples["samples_path"], store.frames, load_text_tokenizer(checkpoints.model))
    except (FileNotFoundError, ValueError) as error:
        raise dg.Failure(f"sample lengths: {error}") from error
    write_parquet(lengths, lengths_path)
    context.log.info(f"{len(train)} train / {len(validation)} validation samples ({mode})")
    return dg.MaterializeResult(
        metadata={
            "train_count": len(train),
            "validation_count": len(validation),
            "validation_share": len(validation) / max(len(index), 1),
            "train_speakers": int(train["speaker"].nunique()),
            "validation_speakers": int(validation["speaker"].nunique()),
            "speakers_in_both": len(set(train["speaker"]) & set(validation["speaker"])),
            "groups_train": result.groups_train,
            "groups_validation": result.groups_validation,
            "split_mode": mode,
            "split_group": result.group_column,
            "validation_texts_in_train": validation_texts_in_train(index["text_key"], result.is_validation),
            "validation_fraction": config.validation_fraction,
            "split_path": split_path,
            "sample_lengths_path": lengths_path,
            "text_tokenizer": checkpoints.model,
            "samples_path": samples["samples_path"],
            "samples_index_path": samples["samples_index_path"],
            "token_store_root": tokens["token_store_root"],
            "tokenizer": tokens["tokenizer"],
            "corpus_version": samples["corpus_version"],
        },
        data_version=dg.DataVersion(digest(json.dumps(split))),
    )


def _text_keys(samples_path: str, sample_ids: pd.Series) -> pd.Series:
    """`text_keys` of each sample's target text, aligned with `sample_ids`."""
    texts = {record.sample_id: target_text(record.chatml) for record in read_records(samples_path)}
    missing = [sample for sample in sample_ids if sample not in texts]
    if missing:
        raise dg.Failure(f"samples {missing[:5]} are in the sample index but not in {samples_path}")
    return text_keys(pd.Series([texts[sample] for sample in sample_ids], dtype="str", index=sample_ids.index))


@dg.asset_check(asset=train_val_split, blocking=True)
def train_val_split_is_a_partition(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """No sample in both splits or twice, every sample in one, no target clip (or held-out speaker) in both, and
    no dialogue divided between them."""
    meta = upstream_metadata(context, "train_val_split")
    split = read_split(meta["split_path"])
    index = read_parquet(meta["samples_index_path"])
    if meta["split_group"] == GROUP_COLUMNS["text"]:
        index["text_key"] = _text_keys(meta["samples_path"], index["sample_id"])
    index = index.set_index("sample_id")
    train, validation = split["train"], split["validation"]
    problems = []
    both = set(train) & set(validation)
    if both:
        problems.append(f"{len(both)} samples in both splits, e.g. {sorted(both)[:3]}")
    if len(set(train)) != len(train) or len(set(validation)) != len(validation):
        problems.append("a sample is listed twice")
    if set(train) | set(validation) != set(index.index):
        problems.append("the splits do not cover exactly the samples of chatml_samples")
    group = meta["split_group"]
    if group != "sample_id" and not problems:
        leaked = set(index.loc[train, group]) & set(index.loc[validation, group])
        if leaked:
            problems.append(f"{len(leaked)} {group} values on both sides")
    if "dialogue_id" in index and not problems:
        dialogues = index["dialogue_id"].astype("str")
        divided = (set(dialogues[train]) & set(dialogues[validation])) - {""}
        if divided:
            problems.append(f"{len(divided)} dialogues divided between the sides, e.g. {sorted(divided)[:3]}")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"train": len(train), "validation": len(validation), "problems": "; ".join(problems) or "none"},
    )
