"""Every knob the server reads from the environment, declared once."""

from __future__ import annotations

import logging
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runner import wire_version

log = logging.getLogger(__name__)

# Flags go-livepeer passes from aiModels.json `optimization_flags`, and the reference runner's
# own environment (its safety checker's device, its vLLM engine's tuning): the ones this runner
# does not implement are logged, never fatal, so an operator's existing config keeps working.
OPTIMISATION_FLAGS = ("SFAST", "SFAST_WARMUP", "DEEPCACHE", "TORCH_COMPILE", "TENSORRT",
                      "ONEDIFF", "BFLOAT16", "SAFETY_CHECKER_DEVICE", "BACKEND",
                      "PREPARE_MODELS", "USE_8BIT", "MAX_NUM_BATCHED_TOKENS", "MAX_NUM_SEQS",
                      "MAX_MODEL_LEN", "GPU_MEMORY_UTILIZATION", "TENSOR_PARALLEL_SIZE",
                      "PIPELINE_PARALLEL_SIZE")
IMPLEMENTED_FLAGS: frozenset[str] = frozenset({"TORCH_COMPILE"})

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    pipeline: str = Field("all", description="One pipeline name, a comma list, or 'all'.")
    model_id: str = Field("", description="Default model of a single pipeline; '' = models.yaml.")
    host: str = "0.0.0.0"
    port: int = 8000
    auth_token: str = ""
    model_dir: Path = Path("/models")
    models_file: Path = REPO_ROOT / "models.yaml"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    tiny: bool | None = Field(
        None, description="CPU tiny-model mode; unset = on when DEVICE=auto finds no CUDA."
    )
    tiny_dir: Path = Path(os.path.expanduser("~/.cache/runner/tiny-models"))
    version: str = Field(
        wire_version(), description="What /version reports; go-livepeer compares it with a "
        "gateway's -aiMinRunnerVersion as semver, so the default is the contract version this "
        "runner implements with its own version as build metadata.")
    verbose_logging: bool = False
    safety_policy: Literal["black", "blur", "flag"] = "black"
    vram_budget: ByteSize | None = Field(None, description="Overrides the device's byte budget.")
    vram_reserve: ByteSize = ByteSize(1 << 30)
    max_upload_bytes: ByteSize = ByteSize(50 * (1 << 20))
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a connection may take to send a request's headers "
        "(from opening, or from its previous answer) before it is closed.")
    body_stall_seconds: float = Field(
        30.0, ge=0, description="Seconds a request body may go without a byte before the "
        "request is refused (408; 400 where go-livepeer's client has no 408); 0 = no limit.")
    upload_drain_seconds: float = Field(
        10.0, ge=0, description="After an upload over MAX_UPLOAD_BYTES is refused from its "
        "Content-Length, seconds the rest of its body may still be read and thrown away, so "
        "that a client which writes its whole body before reading gets the answer instead of "
        "a connection reset; 0 = close at once.")
    upload_drain_bytes: ByteSize | None = Field(
        None, description="The most of such a body read and thrown away; unset = 4 x "
        "MAX_UPLOAD_BYTES.")
    max_connections: int = Field(
        512, ge=1, description="Open connections; past it the oldest one without a request "
        "in progress is closed.")
    max_image_pixels: int = 4096 * 4096
    host_budget: ByteSize | None = Field(
        None, description="CPU RAM for demoted models; unset = half the free RAM at start on a "
        "GPU, 0 (no host tier) on CPU, where demoting frees nothing.")
    max_queue: int = Field(16, ge=0, description="Requests waiting per model before busy.")
    max_queue_total: int = Field(64, ge=1, description="Requests in hand across all models.")
    queue_timeout: float = Field(
        240.0, description="Seconds a request may wait for its model, turn and memory; 0 = "
        "no limit. go-livepeer sends a cold container its request while it loads (up to 3 "
        "minutes before it gives up on it), so this covers a cold load.")
    busy_log_seconds: float = Field(
        10.0, ge=0, description="A model's busy answers (full queue, deadline passed, no room "
        "now) are logged at WARNING at most once per this many seconds, each line saying how "
        "many were refused since the last; runner_rejected_total counts every one. 0 = a line "
        "for each.")
    error_statuses: Literal["go-livepeer", "http"] = Field(
        "go-livepeer", description="go-livepeer: the contract routes answer only statuses "
        "go-livepeer's client decodes for each (busy is a 500 'insufficient capacity: ...' with "
        "Retry-After, an oversize upload a 400 where 413 is not decoded); http: 503 and 413 as "
        "HTTP means them. /v1 and /models always answer HTTP's.")
    billed_defaults: bool = Field(
        True, description="Unset request fields that go-livepeer bills at a fixed value take "
        "that value (text-to-image: 512x512), so the work done is the work paid for; false: "
        "the model's own defaults from models.yaml.")
    png_compress_level: int = Field(1, ge=0, le=9)
    shutdown_grace_seconds: int = Field(
        5, ge=0, description="On SIGTERM, how long in-flight requests may take to finish; "
        "go-livepeer kills a container 8 s after it asks it to stop.")
    torch_compile: bool = Field(
        False, description="torch.compile the diffusion UNet and VAE decoder, warmed up at the "
        "served sizes at start (go-livepeer's TORCH_COMPILE flag); the compiled kernels are "
        "cached under MODEL_DIR/.cache/torchinductor for the next start.")
    health_probe_seconds: float = Field(
        5.0, description="How often warm models are re-checked after start-up; 0 = never.")

    live_orch_url: str = Field(
        "", description="go-livepeer's runner-facing URL (its -liveRunnerAddr): with "
        "LIVE_ORCH_SECRET and LIVE_RUNNER_URL, each served pipeline registers there as a Live "
        "Runner app and heartbeats; '' = no dynamic registration.")
    live_orch_secret: str = Field("", description="go-livepeer's -orchSecret, which "
                                  "authorises a runner's first heartbeat.")
    live_runner_url: str = Field(
        "", description="How the orchestrator reaches this runner, e.g. http://runner:8000; "
        "it appends each pipeline's route.")
    live_price: Decimal | None = Field(
        None, ge=0, description="Price in USD per LIVE_PRICE_UNIT sent with each registration; "
        "unset = 0, which only an offchain orchestrator accepts.")
    live_price_unit: Literal["hour", "720p", "fixed"] = Field(
        "hour", description="What LIVE_PRICE is for: an hour of compute, a 720p frame, or "
        "one request (fixed).")
    live_label: str = Field("runner-", description="Prefix of each registration's label "
                            "(the pipeline name follows).")

    @field_validator("pipeline")
    @classmethod
    def _strip(cls, v: str) -> str:
        return ",".join(p.strip() for p in v.split(",") if p.strip()) or "all"

    def pipeline_names(self, available: list[str]) -> list[str]:
        if self.pipeline == "all":
            return available
        return self.pipeline.split(",")

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not SEMVER.fullmatch(v):
            log.warning("VERSION=%s is not semver: gateways with -aiMinRunnerVersion will skip "
                        "this runner", v)
        return v

    def drain_bytes(self) -> int:
        """UPLOAD_DRAIN_BYTES, or 4 x MAX_UPLOAD_BYTES where unset."""
        if self.upload_drain_bytes is None:
            return 4 * int(self.max_upload_bytes)
        return int(self.upload_drain_bytes)

    def log_optimisation_flags(self) -> None:
        for flag in OPTIMISATION_FLAGS:
            value = os.environ.get(flag)
            if value is not None and flag not in IMPLEMENTED_FLAGS:
                log.warning("optimisation flag %s=%s accepted but not implemented", flag, value)


# What go-livepeer's semver parser (Masterminds) takes: a "v", 1 to 3 numbers, a pre-release,
# build metadata.
SEMVER = re.compile(r"v?\d+(\.\d+){0,2}(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")
