"""Two runs at once never mix their data: a step reads its own run's upstream, else one consistent version.

Real Dagster runs on one real instance, with a small chain shaped like the project's (manifest -> samples ->
tokens, samples + tokens -> split) whose assets read each other through `upstream_metadata`, as every asset of
the project does. A second run is started in the middle of the first (from inside one of its steps), the way
the schedule, the sensor and the UI can overlap retrains.
"""

# No `from __future__ import annotations`: Dagster resolves Config annotations at runtime.
import dagster as dg
import pytest

from higgs_pipeline.defs.upstream import upstream_metadata

pytestmark = pytest.mark.integration


class ManifestConfig(dg.Config):
    name: str


@dg.asset
def manifest(config: ManifestConfig) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"manifest": config.name, "corpus_version": f"v-{config.name}"})


@dg.asset(deps=[manifest])
def other_retrain(context: dg.AssetExecutionContext) -> None:
    """Starts a whole second run on manifest B while this run (on A) is between its steps."""
    result = dg.materialize([manifest], instance=context.instance, run_config=_names("B"))
    assert result.success


def _carry(context, *keys: str) -> dg.MaterializeResult:
    read = [upstream_metadata(context, key) for key in keys]
    return dg.MaterializeResult(metadata={"manifest": read[0]["manifest"], "corpus_version": read[0]["corpus_version"]})


@dg.asset(deps=[manifest, other_retrain])
def samples(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return _carry(context, "manifest")


@dg.asset_check(asset=samples)
def samples_check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True, metadata={"manifest": upstream_metadata(context, "samples")["manifest"]})


@dg.asset(deps=[samples])
def tokens(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return _carry(context, "samples")


@dg.asset(deps=[samples, tokens])
def split(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return _carry(context, "samples", "tokens")


CHAIN = [manifest, samples, tokens, split]


def _names(name: str) -> dict:
    return {"ops": {"manifest": {"config": {"name": name}}}}


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    (event,) = result.asset_materializations_for_node(key)
    return {name: value.value for name, value in event.metadata.items()}


@pytest.fixture()
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def test_a_run_reads_its_own_manifest_when_another_run_materialized_one_in_between(instance):
    first = dg.materialize([manifest, other_retrain, samples, samples_check], instance=instance, run_config=_names("A"))

    assert first.success
    latest = instance.get_latest_materialization_event(dg.AssetKey("manifest"))
    assert latest.run_id != first.run_id and latest.asset_materialization.metadata["manifest"].value == "B"
    # The latest manifest is B's, but run A's samples are built from A's and its check reads A's samples.
    assert _metadata(first, "samples")["manifest"] == "A"
    (evaluation,) = first.get_asset_check_evaluations()
    assert evaluation.metadata["manifest"].value == "A"


def test_an_upstream_from_another_run_that_disagrees_with_this_runs_chain_fails(instance):
    assert dg.materialize([manifest, samples, tokens], instance=instance, run_config=_names("A")).success
    assert dg.materialize([manifest, samples], instance=instance, run_config=_names("B")).success

    # This run makes samples from B, but tokens (not in this run) were made from A by another run.
    mixed = dg.materialize(CHAIN, selection=[samples, split], instance=instance, raise_on_error=False)

    assert not mixed.success
    message = _failure_message(mixed, "split")
    assert "samples at corpus_version v-B" in message and "tokens at corpus_version v-A" in message
    assert mixed.run_id in message


def test_two_upstreams_from_different_runs_with_different_data_fail_even_with_nothing_made_in_this_run(instance):
    assert dg.materialize([manifest, samples, tokens], instance=instance, run_config=_names("A")).success
    second = dg.materialize([manifest, samples], instance=instance, run_config=_names("B"))

    mixed = dg.materialize([split], instance=instance, raise_on_error=False)

    assert not mixed.success
    message = _failure_message(mixed, "split")
    assert (
        f"samples at corpus_version v-B (run {second.run_id})" in message and "tokens at corpus_version v-A" in message
    )


def test_one_consistent_version_from_earlier_runs_is_read_as_before(instance):
    assert dg.materialize([manifest, samples, tokens], instance=instance, run_config=_names("A")).success

    later = dg.materialize([split], instance=instance)

    assert later.success and _metadata(later, "split")["manifest"] == "A"


def test_never_materialized_upstream_names_the_asset(instance):
    result = dg.materialize([samples], instance=instance, raise_on_error=False)

    assert "asset 'manifest' has never been materialized" in _failure_message(result, "samples")


def _failure_message(result: dg.ExecuteInProcessResult, step: str) -> str:
    failures = [event for event in result.all_events if event.is_step_failure and event.step_key == step]
    assert failures, f"step {step} did not fail"
    return failures[0].step_failure_data.error.message


@dg.asset(deps=[samples])
def flaky(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Fails in a first run, succeeds when that run is re-executed from the failure."""
    if context.run.parent_run_id is None:
        raise dg.Failure("first attempt fails")
    return _carry(context, "samples")


def _retry_job() -> dg.JobDefinition:
    assets = [manifest, samples, flaky]
    return dg.Definitions(
        assets=assets, jobs=[dg.define_asset_job("retry_job", assets, executor_def=dg.in_process_executor)]
    ).resolve_job_def("retry_job")


def test_a_run_reexecuted_from_failure_reads_what_its_parent_run_made(instance):
    job = dg.reconstructable(_retry_job)
    first = dg.execute_job(job, instance=instance, run_config=_names("A"))
    assert [event.step_key for event in first.all_events if event.is_step_failure] == ["flaky"]
    assert dg.materialize([manifest, samples], instance=instance, run_config=_names("B")).success

    options = dg.ReexecutionOptions.from_failure(first.run_id, instance)
    retried = dg.execute_job(job, instance=instance, reexecution_options=options)

    assert retried.success
    (event,) = retried.asset_materializations_for_node("flaky")
    assert event.metadata["manifest"].value == "A"
