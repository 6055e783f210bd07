"""Generate a text-to-speech audio file based on the provided text input and speaker description.

Parler-TTS (`parler-tts/parler-tts-large-v1`, `-mini-v1`): a T5 text encoder reads the speaker
description, a decoder generates audio codes for the text conditioned on it, and the model's
audio codec (DAC at 44.1 kHz for the real checkpoints) turns them into a waveform. The answer is
a mono 16-bit WAV data URL at the model's own sampling rate.

Long text is read in pieces: the real models were trained on clips of at most 30 seconds and
their generation config stops there, so one long generate would cut the speech off. The text is
split at sentence boundaries (at word boundaries inside a sentence longer than a piece), each
piece is generated with the same description and the same seed, and the pieces are joined with a
short pause. Text beyond the entry's hard limit (`max_characters`) is refused with a 400 instead
of queueing minutes of generation.

parler-tts works only with transformers <= 4.51, so this pipeline is served from its own
environment (`make install-tts`, `.venv-tts`); parler_tts and transformers are imported inside
the functions so that the module still imports (and the spec still lists the route) elsewhere.
"""

from __future__ import annotations

import logging
import re
import secrets
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, field_validator

from pipelines import _working_memory as wm
from pipelines._fields import ModelId
from runner.context import RunContext
from runner.device import Device
from runner.errors import BadRequest
from runner.hub import ModelFiles, writing_snapshot
from runner.media import wav_data_url
from runner.options import Options as BaseOptions
from runner.registry import ModelEntry
from runner.sample import Sample, Scale

if TYPE_CHECKING:
    import numpy as np

NAME = "text-to-speech"
REQUIRES = ("parler_tts", "soundfile")
DEFAULT_DESCRIPTION = ("A male speaker delivers a slightly expressive and animated speech with a "
                       "moderate speed and pitch.")
MAX_DESCRIPTION_CHARS = 2000  # the description is read whole by the T5 encoder on every piece
DEFAULT_MAX_CHARACTERS = 5000
DEFAULT_CHUNK_CHARACTERS = 300
DEFAULT_PAUSE_SECONDS = 0.25

log = logging.getLogger(__name__)


class TextToSpeechParams(BaseModel):
    model_id: ModelId = ""
    text: str = Field(
        "", min_length=1, validate_default=True,
        description="Text input for speech generation; longer texts are read in pieces split "
        "at sentence boundaries, up to the model's character limit (400 beyond it).")
    description: str = Field(
        DEFAULT_DESCRIPTION, max_length=MAX_DESCRIPTION_CHARS,
        description="Description of speaker to steer text to speech generation.")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text must contain something to say")
        return text


class MediaURL(BaseModel):
    """A URL from which media can be accessed."""

    url: str = Field(description="The URL where the media can be accessed.")


class AudioResponse(BaseModel):
    """Response model for audio generation."""

    audio: MediaURL = Field(description="The generated audio.")


Request = TextToSpeechParams
Response = AudioResponse


class Options(BaseOptions):
    """models.yaml `options:` of text-to-speech models."""

    max_characters: int = Field(DEFAULT_MAX_CHARACTERS, ge=1,
                                description="Longer text is refused with a 400.")
    chunk_characters: int = Field(DEFAULT_CHUNK_CHARACTERS, ge=1, description="Most characters "
                                  "per generated piece (split at sentence, then word, bounds).")
    pause_seconds: float = Field(DEFAULT_PAUSE_SECONDS, ge=0,
                                 description="Silence between the pieces.")


@dataclass
class ParlerModel:
    model: Any  # ParlerTTSForConditionalGeneration
    tokenizer: Any  # the folder's tokenizer, for the description and the text alike
    device: Device
    sampling_rate: int


def sampling_rate(model: Any) -> int:
    """The rate the model's audio codec produces, read from its config."""
    rate = getattr(model.config, "sampling_rate", None)
    if rate is None:
        rate = model.audio_encoder.config.sampling_rate
    return int(rate)


def quiet_parler() -> None:
    """parler_tts logs outside transformers' logger tree, so TRANSFORMERS_VERBOSITY misses it:
    every load would print each sub-model's whole config as a warning ("... is overwritten by
    shared ... config"). Kept when the runner logs at DEBUG (VERBOSE_LOGGING)."""
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("parler_tts").setLevel(logging.ERROR)
    # transformers' Encodec builds a buffer from a tensor on every construction (harmless).
    warnings.filterwarnings("ignore", message="To copy construct from a tensor",
                            category=UserWarning, module="transformers.models.encodec")


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> ParlerModel:
    quiet_parler()
    from parler_tts import ParlerTTSForConditionalGeneration
    from transformers import AutoTokenizer

    folder = files.folder(entry.main.repo, entry.main.revision)
    # SDPA for the decoder, the only attention that matters (it runs once per audio frame);
    # a plain "sdpa" would also be forced onto the T5 description encoder, which has no SDPA
    # in transformers 4.46 and fails to load. The encoder and codec keep their defaults. The
    # same on CPU, so that the tiny mode runs the GPU's code path.
    model = ParlerTTSForConditionalGeneration.from_pretrained(
        folder, torch_dtype=device.dtype(entry.dtype), attn_implementation={"decoder": "sdpa"})
    model.eval().to(device.torch)
    # Parler's model cards read the description and the text with the same (flan-T5) tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return ParlerModel(model, tokenizer, device, sampling_rate(model))


# -- splitting long text -------------------------------------------------------------------

# A sentence: the shortest run of text that ends in terminal punctuation (closing quotes and
# brackets included) followed by whitespace or the end, or in CJK terminal punctuation, which
# needs no space after it; or whatever is left at the end.
_SENTENCE = re.compile(
    r""".+?(?:[.!?\u2026]+["'\u201d\u2019)\]]*(?=\s|$)|[\u3002\uff01\uff1f]+["'\u201d\u2019)\]]*|$)""",
    re.S)
_PARAGRAPH = re.compile(r"\n\s*\n")


def sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace collapsed; blank lines end a sentence too."""
    found = []
    for paragraph in _PARAGRAPH.split(text):
        for match in _SENTENCE.finditer(paragraph.strip()):
            sentence = " ".join(match.group().split())
            if sentence:
                found.append(sentence)
    return found


def _pack(parts: list[str], limit: int) -> list[str]:
    """Consecutive parts joined by spaces into pieces of at most `limit` characters."""
    pieces: list[str] = []
    for part in parts:
        if pieces and len(pieces[-1]) + 1 + len(part) <= limit:
            pieces[-1] += " " + part
        else:
            pieces.append(part)
    return pieces


def _split_sentence(sentence: str, limit: int) -> list[str]:
    """A sentence longer than a piece, cut at word boundaries (inside a word only when one word
    alone is longer than a piece)."""
    words = []
    for word in sentence.split():
        words += [word[i:i + limit] for i in range(0, len(word), limit)]
    return _pack(words, limit)


def split_text(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut at sentence boundaries where a piece
    can hold whole sentences; never an empty piece."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    pieces: list[str] = []
    run: list[str] = []  # whole sentences waiting to be packed
    for sentence in sentences(text):
        if len(sentence) <= limit:
            run.append(sentence)
            continue
        pieces += _pack(run, limit) + _split_sentence(sentence, limit)
        run = []
    return pieces + _pack(run, limit)


# -- inference -----------------------------------------------------------------------------

def generate_piece(model: ParlerModel, description: Any, text: str, seed: int) -> np.ndarray:
    """One piece of speech as a 1-D float32 numpy array at the model's sampling rate."""
    import torch

    prompt = model.tokenizer(text, return_tensors="pt").to(model.device.torch)
    torch.manual_seed(seed)  # every piece starts from the same seed (CUDA included)
    with torch.inference_mode():
        audio = model.model.generate(
            input_ids=description.input_ids, attention_mask=description.attention_mask,
            prompt_input_ids=prompt.input_ids, prompt_attention_mask=prompt.attention_mask)
    return audio[0].float().cpu().numpy().reshape(-1)


def run(model: ParlerModel, request: TextToSpeechParams, ctx: RunContext) -> AudioResponse:
    import numpy as np

    options = Options.of(ctx.entry)
    # 1. The hard cap: beyond it the request is refused, not queued for minutes.
    limit = options.max_characters
    if len(request.text) > limit:
        raise BadRequest(f"text is {len(request.text)} characters long; {ctx.entry.id} reads "
                         f"at most {limit} per request")
    # 2. Pieces the model can read in one generate: whole sentences where they fit.
    pieces = split_text(request.text, options.chunk_characters)
    # 3. The description is tokenized once and steers every piece.
    description = model.tokenizer(request.description, return_tensors="pt").to(
        model.device.torch)
    # 4. Each piece with the same description and the same (per-request random) seed, so the
    #    pieces sound like one speaker as far as Parler allows.
    seed = secrets.randbits(32)
    log.debug("text-to-speech: %d pieces, seed %d", len(pieces), seed)
    audio = []
    with ctx.stage("generate"):
        for piece in pieces:
            audio.append(generate_piece(model, description, piece, seed))
    # 5. Joined with a short silence between pieces.
    pause = np.zeros(round(options.pause_seconds * model.sampling_rate), dtype=np.float32)
    joined = [audio[0]]
    for samples in audio[1:]:
        joined += [pause, samples]
    # 6. A 16-bit mono WAV at the model's own sampling rate.
    with ctx.stage("encode"):
        url = wav_data_url(np.concatenate(joined), model.sampling_rate)
    return AudioResponse(audio=MediaURL(url=url))


# -- tiny checkpoint for CPU mode ------------------------------------------------------------
# The configs measured in ../shared/notes/tiny-models-transformers.md ("c. Parler-TTS"), with
# the tiny Encodec codec instead of DAC (whose decoder cannot be made small through its config).

TINY_CORPUS = [
    "Hello there.",
    "A male speaker delivers a slightly expressive and animated speech with a moderate speed "
    "and pitch.",
    "A female speaker talks quickly in a quiet room with very clear audio.",
    "The quick brown fox jumps over the lazy dog.",
    "This is a tiny random tokenizer, made for tests only!",
    "Numbers: one, two, three, four, five, six, seven, eight, nine and ten?",
]
TINY_FRAMES = 32  # audio frames per piece: every piece is exactly this long on random weights


def tiny_tokenizer(workdir: Path) -> Any:
    """A unigram sentencepiece T5 tokenizer trained on a few sentences (about 75 pieces)."""
    import sentencepiece
    from transformers import T5Tokenizer, T5TokenizerFast

    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(TINY_CORPUS) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(workdir / "spiece"), model_type="unigram",
        vocab_size=120, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2)
    slow = T5Tokenizer(vocab_file=str(workdir / "spiece.model"), extra_ids=0, legacy=False)
    slow.save_pretrained(workdir / "slow")
    # Saved fast, as the real repos are (tokenizer.json beside spiece.model): no conversion at
    # load time.
    return T5TokenizerFast.from_pretrained(workdir / "slow")


def tiny_model(vocab_size: int) -> Any:
    import torch
    from parler_tts import (
        ParlerTTSConfig,
        ParlerTTSDecoderConfig,
        ParlerTTSForConditionalGeneration,
    )
    from transformers import EncodecConfig, T5Config

    # Hop length 8*5*4*2 = 320 samples: 75 frames/s at 24 kHz and 2 quantizers at 1.5 kbps. A
    # smaller hop gives 0 quantizers, and more quantizers than layers fail at decode.
    codec = EncodecConfig(
        sampling_rate=24000, audio_channels=1, normalize=False, hidden_size=16, num_filters=4,
        num_residual_layers=1, upsampling_ratios=[8, 5, 4, 2], codebook_size=32,
        codebook_dim=16, num_lstm_layers=1, kernel_size=3, last_kernel_size=3,
        residual_kernel_size=3, compress=2, target_bandwidths=[1.5])
    codes = codec.codebook_size  # audio code ids 0..codes-1; codes = pad/eos, codes+1 = bos
    text = T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                    num_heads=2, relative_attention_num_buckets=8)
    decoder = ParlerTTSDecoderConfig(
        vocab_size=codes + 1, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
        # Positions cover the text's tokens and the audio frames: a 300-character piece of
        # text unknown to the tiny vocabulary is about one token a character.
        num_attention_heads=2, max_position_embeddings=1024, pad_token_id=codes,
        eos_token_id=codes, bos_token_id=codes + 1, num_codebooks=codec.num_quantizers)
    config = ParlerTTSConfig(
        text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict(),
        vocab_size=vocab_size, pad_token_id=codes, decoder_start_token_id=codes + 1)
    torch.manual_seed(0)
    model = ParlerTTSForConditionalGeneration(config)
    # Encodec's codebooks are buffers that start at zero (training fills them): every code
    # would decode to the same sound, whatever the text or seed. Random vectors instead.
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
    generation = model.generation_config
    generation.decoder_start_token_id = generation.bos_token_id = codes + 1
    generation.pad_token_id = generation.eos_token_id = codes
    generation.do_sample, generation.guidance_scale = True, 1
    # Random weights never learned to stop: bound generation, and make every piece the same
    # length (min = max), which the tests use to count pieces from the duration.
    generation.max_length = None
    generation.max_new_tokens = generation.min_new_tokens = TINY_FRAMES
    return model


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    quiet_parler()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
        model = tiny_model(len(tokenizer))
        with writing_snapshot(model_dir, entry.main.repo) as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)


def working_memory(entry: ModelEntry, files: ModelFiles, request: Any, float_bytes: int) -> int:
    """One chunk of text at a time; the audio codes of ~30 s dominate: parler-tts-large's
    figure at its decoder's 1536 channels, scaled by this model's decoder width."""
    found = wm.model_config(files, entry.main.repo, entry.main.revision)
    return wm.fixed(512, float_bytes, scale=wm.width(found, 1536, "decoder.hidden_size"))


def sample_request(scale: Scale) -> Sample:
    """One sentence in a described voice."""
    return Sample({"text": "The quick brown fox jumps over the lazy dog.",
                   "description": "A female speaker talks quickly in a quiet room with very "
                                  "clear audio.", "model_id": scale.model})
