"""services.OCSF_SINKS: the variables that each configure an OCSF sink. Without one of them the
sidecar does not import the OCSF mapping (idle RSS, issue 16; through a real sidecar:
tests/sidecar/integration/test_idle_modules.py), so the list must name every sink
``exporter_from_env`` builds, and nothing else."""

from __future__ import annotations

from chaperone_sidecar import contract
from chaperone_sidecar.recording.ocsf_export import exporter_from_env
from chaperone_sidecar.services import OCSF_SINKS


class _Store:  # the S3 sink only keeps a reference to the recording's store until it ships
    pass


def test_every_sink_variable_builds_an_exporter_alone(tmp_path):
    values = {contract.ENV_OCSF_FILE: str(tmp_path / "ocsf.jsonl"), contract.ENV_OCSF_S3_PREFIX: "siem",
              contract.ENV_OCSF_OTLP_ENDPOINT: "http://127.0.0.1:9/v1/logs"}
    assert set(OCSF_SINKS) == set(values)
    for name in OCSF_SINKS:
        exporter = exporter_from_env({name: values[name]}, s3_store=_Store())
        assert exporter is not None and len(exporter.sinks) == 1, name
        exporter.close()


def test_no_other_ocsf_variable_builds_one():
    others = {getattr(contract, n): "1" for n in dir(contract)
              if n.startswith("ENV_OCSF_") and getattr(contract, n) not in OCSF_SINKS}
    others.update({"CHAPERONE_OCSF_QUEUE": "7", "CHAPERONE_OCSF_S3_BATCH_BYTES": "1",
                   "CHAPERONE_OCSF_S3_INTERVAL": "1", "CHAPERONE_OCSF_FILE_MAX_BYTES": "1"})
    assert exporter_from_env(others, s3_store=_Store()) is None
