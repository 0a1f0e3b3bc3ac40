"""aws_models reads botocore's service models itself (issue 16: no ``botocore.loaders`` in the
sidecar, ~4 MB of idle RSS): it must find and read exactly what botocore's ``Loader`` does."""

from __future__ import annotations

import subprocess
import sys

import pytest
from botocore.loaders import Loader

from chaperone_sidecar.policy import aws_catalog
from chaperone_sidecar.policy.classify import aws_models

# Every service whose model botocore merges sdk extras into, and the most used ones.
SAMPLE = ("s3", "rds", "docdb", "neptune", "eks", "secretsmanager", "ec2", "iam", "sqs", "sts",
          "lambda", "dynamodb", "s3control", "kms")


def test_same_services_and_files_as_botocore_loader():
    loader = Loader()
    services = loader.list_available_services("service-2")
    assert aws_models.available_services() == services
    assert len(services) > 300
    for service in services:
        version = loader.determine_latest_version(service, "service-2")
        assert aws_models.latest_version(service) == version, service
        path = aws_models.model_file(service)
        assert path is not None and f"/{service}/{version}/service-2.json" in path, service


@pytest.mark.parametrize("service", SAMPLE)
def test_same_model_as_botocore_loader(service):
    ours = aws_models.load_model(service)
    theirs = Loader().load_service_model(service, "service-2")
    assert ours == theirs  # the sdk extras merged in as botocore merges them
    assert list(ours["operations"]) == list(theirs["operations"])  # order: REST template ties


def test_extras_are_merged():
    # s3's sdk extras add the Expires shape; eks's set metadata.serviceId
    assert aws_models.load_model("s3")["shapes"]["Expires"] == {"type": "timestamp"}
    assert aws_models.load_model("eks")["metadata"]["serviceId"] == "EKS"


@pytest.mark.parametrize("service", SAMPLE)
def test_catalog_operations_match_botocore_loader(service):
    """The policy compiler's AWS vocabulary reads the operation names botocore's Loader reads
    (for every other service the file is the same: test_same_services_and_files_...)."""
    assert aws_catalog._model_operations(service) == list(
        Loader().load_service_model(service, "service-2")["operations"])


def test_unknown_service():
    assert aws_models.model_file("no-such-service") is None
    assert aws_models.load_model("no-such-service") is None


def test_classifier_and_catalog_do_not_import_botocore():
    """What the sidecar loads in every pod to classify AWS calls and check policies' AWS names
    is free of botocore's machinery (it was botocore.loaders: urllib3, dateutil, xml...)."""
    code = ("import sys; from chaperone_sidecar.policy import aws_catalog; "
            "from chaperone_sidecar.policy.classify import aws_models; "
            "aws_models.service('s3'); assert aws_catalog.action_error('s3:DeleteBucket') is None; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('botocore', 'urllib3', 'dateutil')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
