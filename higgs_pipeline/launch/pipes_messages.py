"""Which Dagster Pipes message writer the trainer's rank 0 uses, chosen by what the launcher asked for.

A local torchrun or a single pod (PipesK8sClient) reads the trainer's messages from a file or the pod's logs:
dagster_pipes' default writer handles those. In a multi-node PyTorchJob the global rank 0 may land on any pod,
so no single pod's logs are sure to carry the messages; that launcher passes S3 message params (a bucket and a
key prefix) instead, which only dagster_pipes' own `PipesS3MessageWriter` can serve.
"""

from __future__ import annotations

from dagster_pipes import (
    PipesDefaultMessageWriter,
    PipesEnvVarParamsLoader,
    PipesMessageWriter,
    PipesS3MessageWriter,
)

S3_BUCKET_KEY = "bucket"


def pipes_message_writer(params_loader: PipesEnvVarParamsLoader | None = None) -> PipesMessageWriter:
    """S3 when the messages params name a bucket, else the default (file / stdio) writer."""
    params = (params_loader or PipesEnvVarParamsLoader()).load_messages_params()
    if S3_BUCKET_KEY in params:
        import boto3  # a dependency of boson-multimodal; reads AWS_ENDPOINT_URL and credentials from the env

        return PipesS3MessageWriter(client=boto3.client("s3"), interval=5)
    return PipesDefaultMessageWriter()
