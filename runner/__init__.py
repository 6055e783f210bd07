"""The runner: a drop-in GPU worker for Livepeer-style AI pipelines."""

__version__ = "0.1.0"
# The reference runner contract this runner implements (ai-runner's release of the same number,
# tests/fixtures/contract/openapi.yaml).
CONTRACT_VERSION = "0.14.1"


def wire_version() -> str:
    """What /version reports by default: go-livepeer and its gateways compare it as semver
    (build metadata ignored), so it reads as the contract version, with ours after the `+`."""
    return f"{CONTRACT_VERSION}+runner.{__version__}"
