"""Transcribe audio files to text.

Whisper (large-v3, large-v3-turbo, medium, distil-large-v3) through transformers' ASR pipeline:
the upload is decoded in-process with PyAV to 16 kHz mono float32 (wav, flac, mp3, mp4/m4a,
webm, ogg; 415 when undecodable, 400 past the entry's `max_seconds`) and handed over as an
array, never as a file name or bytes (transformers would shell out to an `ffmpeg` binary).

Long audio is cut into `chunk_length_s` windows (30 s; distil-large-v3 was trained on 25 s)
that run `batch_size` at a time, one greedy `generate` call per window (`num_beams=1`,
`force_unique_generate_call`; word requests aside, see generate_kwargs): the pipeline's chunk
merging is the long-form mechanism, as with transformers 4.x, which the reference runner used.
`return_timestamps` picks segment chunks (`true`, `1`, `sentence`), word chunks (`word`) or
none (`false`, `0`); a chunk's end is null when Whisper predicted no closing timestamp.

Word timestamps come from cross-attention weights, which SDPA does not return: transformers
switches the model to eager attention for such a request and leaves it there. run() restores
the loaded implementation afterwards, so only word requests pay for eager attention (a model
runs one request at a time: `max_concurrency` 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from pipelines import _working_memory as wm
from pipelines._fields import ModelId
from pipelines._tokens import byte_symbols
from runner.context import RunContext
from runner.device import Device
from runner.errors import BadRequest
from runner.hub import ModelFiles, writing_snapshot
from runner.media import decode_audio
from runner.options import Options as BaseOptions
from runner.protocol import Upload
from runner.registry import ModelEntry
from runner.sample import Sample, Scale, Speech

NAME = "audio-to-text"
REQUIRES = ("transformers>=4.56", "av")
# go-livepeer's client decodes 413 and 415 on this route (an upload too large, undecodable audio).
ERROR_STATUSES = (400, 401, 413, 415, 422, 500)
RATE = 16_000  # Whisper's feature extractor works at 16 kHz
DEFAULT_MAX_SECONDS = 2 * 60 * 60.0
DEFAULT_CHUNK_LENGTH_S = 30.0
DEFAULT_BATCH_SIZE = 16
# Greedy decoding and one generate call per window. The v5 ASR pipeline would otherwise use 5
# beams unless the model's generation_config.json sets num_beams, and v5 Whisper re-runs
# generate inside a window until its timestamps reach the window's end (on random weights: up
# to 1780 decoder forwards). models.yaml `options.generate_kwargs` overrides these.
DEFAULT_GENERATE = {"num_beams": 1, "force_unique_generate_call": True}

# return_timestamps as the Go client sends it -> what the transformers pipeline takes.
TIMESTAMP_MODES: dict[str, bool | Literal["word"]] = {
    "true": True, "1": True, "sentence": True, "word": "word", "false": False, "0": False,
}


class AudioToTextParams(BaseModel):
    audio: Upload = Field(description="Uploaded audio file to be transcribed.")
    model_id: ModelId = ""
    return_timestamps: str = Field(
        "true", description="Return timestamps for the transcribed text. Supported values: "
        "'sentence', 'word', or a string boolean ('true' or 'false'). Default is 'true' "
        "('sentence'). 'false' means no timestamps. 'word' means word-based timestamps.")
    metadata: str = Field(
        "{}", description="Additional job information to be passed to the pipeline: a JSON "
        "string.")

    @field_validator("return_timestamps")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        normalised = value.strip().lower()
        if normalised not in TIMESTAMP_MODES:
            raise ValueError(f"return_timestamps must be one of {', '.join(TIMESTAMP_MODES)}")
        return normalised


class Chunk(BaseModel):
    """A chunk of text with a timestamp."""

    timestamp: list[float | None] = Field(
        description="The timestamp of the chunk: [start, end] in seconds; end is null when "
        "the model predicted no end.")
    text: str = Field(description="The text of the chunk.")


class TextResponse(BaseModel):
    """Response model for text generation."""

    text: str = Field(description="The generated text.")
    chunks: list[Chunk] = Field(description="The generated text chunks.")


Request = AudioToTextParams
Response = TextResponse


class Options(BaseOptions):
    """models.yaml `options:` of audio-to-text models."""

    chunk_length_s: float = Field(DEFAULT_CHUNK_LENGTH_S, gt=0, description="Seconds of audio "
                                  "per window (what the model was trained on).")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Windows transcribed at once.")
    max_seconds: float = Field(DEFAULT_MAX_SECONDS, gt=0,
                               description="Longer audio is refused with a 400.")
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="generate() arguments over the defaults (greedy, one "
        "generate call per window).")


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> Any:
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline

    options = Options.of(entry)
    folder = files.folder(entry.main.repo, entry.main.revision)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(
        folder, dtype=device.dtype(entry.dtype), attn_implementation="sdpa",
        variant=entry.variant,
    ).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return pipeline(
        "automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor, device=device.torch,
        chunk_length_s=options.chunk_length_s, batch_size=options.batch_size,
        ignore_warning=True,  # "chunk_length_s is very experimental": it is the design here
    )


def max_seconds(entry: ModelEntry) -> float:
    return Options.of(entry).max_seconds


def generate_kwargs(entry: ModelEntry, mode: bool | str) -> dict[str, Any]:
    """The entry's generate() arguments over the defaults. Word timestamps always run without
    `force_unique_generate_call`: with it, transformers 5.23 pairs the token timestamps of the
    window's segments with sequences that still hold the decoder prompt, and its ASR
    post-processing fails with an IndexError."""
    kwargs = {**DEFAULT_GENERATE, **Options.of(entry).generate_kwargs}
    if mode == "word":
        kwargs["force_unique_generate_call"] = False
    return kwargs


def parse_metadata(text: str) -> Any:
    """The job's metadata, any JSON value ('' counts as none); 400 when it is not JSON."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # also: too deeply nested, too many digits
        raise BadRequest(f"metadata is not valid JSON: {exc}") from exc


def run(asr: Any, request: AudioToTextParams, ctx: RunContext) -> TextResponse:
    import torch

    # 1. Fields first, they are cheap: metadata must be JSON (400 otherwise; it is accepted and
    #    not used); return_timestamps was checked by the schema (422).
    parse_metadata(request.metadata)
    mode = TIMESTAMP_MODES[request.return_timestamps]
    # 2. Decode the upload to 16 kHz mono float32: 415 if undecodable, 400 once it passes the
    #    model's max_seconds (checked while decoding, so a long file is never decoded whole).
    with ctx.stage("decode"):
        samples = decode_audio(request.audio.file.read(), RATE, max_seconds(ctx.entry))
    # 3. Transcribe: windows of chunk_length_s, batch_size at a time, greedy. Word timestamps
    #    make transformers switch to eager attention; the loaded implementation comes back after.
    model = asr.model
    loaded_attention = model.config._attn_implementation
    try:
        with ctx.stage("transcribe"), torch.inference_mode():
            result = asr({"raw": samples, "sampling_rate": RATE}, return_timestamps=mode,
                         generate_kwargs=generate_kwargs(ctx.entry, mode))
    finally:
        if model.config._attn_implementation != loaded_attention:
            model.set_attn_implementation(loaded_attention)
    # 4. Chunks as the contract writes them: [start, end], end null when Whisper gave none.
    chunks = [to_chunk(c) for c in result.get("chunks", [])] if mode else []
    return TextResponse(text=result["text"], chunks=chunks)


def to_chunk(chunk: dict[str, Any]) -> Chunk:
    start, end = (tuple(chunk.get("timestamp") or ()) + (None, None))[:2]
    return Chunk(timestamp=[seconds(start) or 0.0, seconds(end)], text=chunk.get("text", ""))


def seconds(value: Any) -> float | None:
    return None if value is None else round(float(value), 2)


# -- tiny checkpoint for CPU mode ------------------------------------------------------------
# The Whisper recipe of ../shared/notes/tiny-models-transformers.md ("a. Whisper"): a byte-level
# vocabulary, Whisper's special tokens, then the 1501 timestamp tokens right after
# <|notimestamps|> (decoding finds them at its id + 1); a 1-layer model whose encoder still
# takes 30 s windows (max_source_positions 1500 = 3000 mel frames / 2).

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
            "<|notimestamps|>"]
TINY_MAX_LENGTH = 16


def tiny_tokenizer() -> Any:
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    vocab = {char: i for i, char in enumerate(byte_symbols())}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True)
        for t in SPECIALS]})
    tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False,
                                     normalized=False) for i in range(1501)])
    return tokenizer


def tiny_whisper(tokenizer: Any) -> Any:
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    assert tokenizer.convert_tokens_to_ids("<|0.00|>") == ids["<|notimestamps|>"] + 1
    config = WhisperConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500,
        max_target_positions=64, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=sot, begin_suppress_tokens=[eot], suppress_tokens=[],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        begin_suppress_tokens=[eot], suppress_tokens=[], max_initial_timestamp_index=50,
        alignment_heads=[[0, 0], [0, 1]],  # word timestamps read these cross-attention heads
        # Random weights rarely emit <|endoftext|>: bound every window's decoding (the prompt
        # is 2-4 tokens), as the real models' max_length (448) does.
        num_beams=1, max_length=TINY_MAX_LENGTH, force_unique_generate_call=True,
    )
    return model


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    tokenizer = tiny_tokenizer()
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                                 tokenizer=tokenizer)
    model = tiny_whisper(tokenizer)
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)


def working_memory(entry: ModelEntry, files: ModelFiles, request: Any, float_bytes: int) -> int:
    """Whisper's working memory follows its fixed 30 s window (1500 encoder positions), times
    the windows in a batch: large-v3's figure at 1280 channels, scaled by this model's width."""
    found = wm.model_config(files, entry.main.repo, entry.main.revision)
    return wm.fixed(384, float_bytes, Options.of(entry).batch_size,
                    scale=wm.width(found, 1500, "max_source_positions")
                    * wm.width(found, 1280, "d_model"))


def sample_request(scale: Scale) -> Sample:
    """A transcript with segment timestamps of `scale.audio_seconds` of speech-like audio."""
    return Sample({"model_id": scale.model, "return_timestamps": "true"},
                  uploads={"audio": Speech(scale.audio_seconds)},
                  params={"seconds": scale.audio_seconds})
