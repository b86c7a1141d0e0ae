"""The data assets against a real S3 API (moto server on 127.0.0.1): an s3:// manifest whose audio lives in the
bucket, artifacts and token shards written to another bucket, all through s3fs configured by AWS_ENDPOINT_URL."""

from __future__ import annotations

import hashlib

import boto3
import dagster as dg
import pandas as pd
import pytest
from audio_factory import Row, failure_message, materialize, metadata_of, speech_corpus, write_csv_manifest

from higgs_pipeline.data.manifest import read_manifest
from higgs_pipeline.data.records import TokenStore, read_records
from higgs_pipeline.data.screening import ScreeningRules, screen_manifest
from higgs_pipeline.data.tables import read_csv, read_parquet, write_csv
from higgs_pipeline.defs.chatml_samples import chatml_samples, chatml_samples_are_well_formed
from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest, raw_audio_manifest_accounts_for_every_row
from higgs_pipeline.defs.tokenized_audio import tokenized_audio, tokenized_audio_shards_readable
from higgs_pipeline.defs.transcript_check import transcript_check

pytestmark = pytest.mark.integration

ASSETS = [
    raw_audio_manifest,
    raw_audio_manifest_accounts_for_every_row,
    transcript_check,
    chatml_samples,
    chatml_samples_are_well_formed,
    tokenized_audio,
    tokenized_audio_shards_readable,
]
DATA, ARTIFACTS = "speech-data", "pipeline-artifacts"


@pytest.fixture()
def bucket_corpus(s3_env, tmp_path) -> dict:
    """Four good clips (wav/flac/mp3, two speakers), a missing file and a path into another bucket, uploaded."""
    client = boto3.client("s3", endpoint_url=s3_env)  # explicit endpoint: an independent view of the server
    for bucket in (DATA, ARTIFACTS, "elsewhere"):
        client.create_bucket(Bucket=bucket)
    local = tmp_path / "corpus"
    rows = speech_corpus(local, 4, speakers=("Alice", "alice "))
    hashes = {}
    for row in rows:
        data = (local / row.audio_path).read_bytes()
        client.put_object(Bucket=DATA, Key=f"corpus/{row.audio_path}", Body=data)
        hashes[f"s3://{DATA}/corpus/{row.audio_path}"] = hashlib.sha256(data).hexdigest()
    client.put_object(Bucket="elsewhere", Key="x.wav", Body=(local / rows[0].audio_path).read_bytes())
    rows += [Row("audio/not_uploaded.wav", "Missing.", "Bob"), Row("s3://elsewhere/x.wav", "Another bucket.", "Bob")]
    manifest = write_csv_manifest(local / "manifest.csv", rows)
    client.put_object(Bucket=DATA, Key="corpus/manifest.csv", Body=manifest.read_bytes())
    return {"client": client, "hashes": hashes, "manifest": f"s3://{DATA}/corpus/manifest.csv"}


@pytest.mark.slow  # the data assets through S3, Whisper included: a minute on 2 cores
def test_s3_manifest_audio_and_artifacts(bucket_corpus):
    client = bucket_corpus["client"]
    instance = dg.DagsterInstance.ephemeral()
    artifacts = f"s3://{ARTIFACTS}/run"
    config = {"raw_audio_manifest": {"manifest_path": bucket_corpus["manifest"]}}
    result = materialize(ASSETS, artifacts, instance, config)
    assert all(check.passed for check in result.get_asset_check_evaluations())

    raw = metadata_of(result, "raw_audio_manifest")
    assert (raw["rows_total"], raw["rows_accepted"], raw["rows_rejected"]) == (6, 4, 2)
    assert raw["manifest_path"] == bucket_corpus["manifest"]
    assert raw["accepted_path"].startswith(f"{artifacts}/raw_audio_manifest/")
    accepted = read_parquet(raw["accepted_path"])
    assert dict(zip(accepted["audio_uri"], accepted["clip_hash"], strict=True)) == bucket_corpus["hashes"]
    rejected = read_csv(raw["rejected_path"]).set_index("audio_path")
    assert rejected.loc["audio/not_uploaded.wav", "reason"] == "missing_file"
    assert rejected.loc["s3://elsewhere/x.wav", "reason"] == "path_outside_manifest_dir"

    samples = metadata_of(result, "chatml_samples")
    assert (samples["speakers"], samples["samples_tts"], samples["samples_voice_clone"]) == (1, 4, 4)
    records = list(read_records(samples["samples_path"]))
    assert all(clip["audio_path"].startswith(f"s3://{DATA}/corpus/audio/") for r in records for clip in r.audio)

    tokens = metadata_of(result, "tokenized_audio")
    assert (tokens["clips"], tokens["clips_tokenized_this_run"]) == (4, 4)
    store = TokenStore(tokens["token_store_root"], tokens["tokenizer"])
    assert all(store.get(h).shape[0] == 8 for h in bucket_corpus["hashes"].values())
    # What s3fs wrote is really on the server that AWS_ENDPOINT_URL names (seen through a separate client).
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=ARTIFACTS, Prefix="run/")["Contents"]]
    assert sum(key.endswith(".npy") and "/shards/" in key for key in keys) == tokens["shards"] == 1
    assert tokens["token_index"].startswith(f"s3://{ARTIFACTS}/") and tokens["token_index"].endswith(".parquet")
    assert any(key.endswith("accepted.parquet") for key in keys) and any(key.endswith("samples.jsonl") for key in keys)

    again = metadata_of(materialize(ASSETS[5:], artifacts, instance), "tokenized_audio")
    assert (again["clips_tokenized_this_run"], again["clips_reused"]) == (0, 4)  # found in the bucket's index


def test_missing_s3_manifest_fails_naming_it(s3_env, tmp_path):
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="empty-bucket")
    uri = "s3://empty-bucket/nothing/manifest.jsonl"
    config = {"raw_audio_manifest": {"manifest_path": uri}}
    result = materialize(ASSETS[:2], tmp_path, dg.DagsterInstance.ephemeral(), config, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert uri in message and "file not found" in message


def test_s3_clips_over_the_byte_cap_are_rejected_from_their_listed_size(bucket_corpus):
    manifest = read_manifest(bucket_corpus["manifest"])
    sizes = {}
    for uri in bucket_corpus["hashes"]:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        sizes[uri] = bucket_corpus["client"].head_object(Bucket=bucket, Key=key)["ContentLength"]
    cap = sorted(sizes.values())[1]  # the smallest two clips fit, the others do not
    rejected = screen_manifest(manifest, ScreeningRules(max_clip_bytes=cap)).rejected.set_index("audio_uri")
    too_large = rejected[rejected["reason"] == "file_too_large"]
    assert set(too_large.index) == {uri for uri, size in sizes.items() if size > cap}
    assert all(f"> max_clip_bytes {cap}" in detail for detail in too_large["detail"])


class _DiskFull:
    def __str__(self) -> str:
        raise OSError("the writer failed half-way")


def test_s3_table_write_that_fails_half_way_leaves_the_old_object(s3_env):
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="atomic")
    path = "s3://atomic/run/rejected.csv"
    write_csv(pd.DataFrame({"row": [1], "reason": ["old"]}), path)
    big = pd.DataFrame({"row": range(100_000), "reason": ["x" * 20] * 99_999 + [_DiskFull()]})
    with pytest.raises(OSError, match="half-way"):
        write_csv(big, path)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="atomic")["Contents"]]
    assert keys == ["run/rejected.csv"]
    assert read_csv(path).values.tolist() == [["1", "old"]]
