"""Full-size random-weight checkpoints for scripts/bench.py --full-size.

Each default model's published architecture (the numbers of its hub config.json, written out
here, so nothing is downloaded) is built with random weights, directly on the GPU, cast to the
serving dtype of its models.yaml entry and saved with `save_pretrained` into MODEL_DIR's Hugging
Face cache layout (`models--org--name/snapshots/<rev>/`), where the runner's own loaders read
it as they read a real snapshot. Compute per request is what the real model costs, with three
caveats, all from the weights being random:
- tokenizers are the tiny ones (a few hundred tokens) over full-size embedding tables: CLIP
  always reads 77 positions, so diffusion is unaffected; Parler's prompt is a few more tokens;
- decoders never learn to stop: Whisper decodes to its max_length (448) in every window, BLIP
  to max_new_tokens (50), and Parler's generation is capped at PARLER_FRAMES per piece;
- images and masks are noise (float16 may even give NaN images; timing is unaffected).
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.hub import ModelFiles, writing_snapshot
from runner.registry import ModelEntry

PARLER_FRAMES = 430  # audio frames per piece, about 5 s at DAC's 86 frames/s

# -- published configs ---------------------------------------------------------------------
# CLIP text towers: SD1.5 / SDXL text_encoder (ViT-L/14), SDXL text_encoder_2 (OpenCLIP
# bigG/14), SD2 / x4 upscaler text_encoder (OpenCLIP ViT-H/14, 23 of its 24 layers).
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
CLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, hidden_act="gelu", projection_dim=512)
CLIP_TEXT_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5)

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
SD15_UNET = dict(  # stable-diffusion-v1-5 (and timbrooks/instruct-pix2pix, 8 in-channels)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
X4_UNET = dict(  # stabilityai/stable-diffusion-x4-upscaler (ldm x4-upscaling.yaml)
    sample_size=128, in_channels=7, out_channels=4, layers_per_block=2,
    block_out_channels=(256, 512, 512, 1024), attention_head_dim=8, cross_attention_dim=1024,
    use_linear_projection=True, num_class_embeds=1000,
    only_cross_attention=(True, True, True, False),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",))
SVD_XT_UNET = dict(  # stabilityai/stable-video-diffusion-img2vid-xt unet/config.json
    sample_size=96, in_channels=8, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), num_attention_heads=(5, 10, 20, 20),
    cross_attention_dim=1024, transformer_layers_per_block=1, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=768, num_frames=25,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3)
SD_VAE = dict(  # the SD1.5 / SDXL / SVD autoencoder: 4 blocks, latent factor 8
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4)
X4_VAE = dict(  # the upscaler's 3-block autoencoder: latent factor 4
    block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    scaling_factor=0.08333)
CLIP_H_VISION = dict(  # SVD's image_encoder (OpenCLIP ViT-H/14)
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
    patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
CLIP_L_VISION = dict(  # CompVis/stable-diffusion-safety-checker's vision tower (ViT-L/14)
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    patch_size=14, image_size=224, hidden_act="quick_gelu")
WHISPER_LARGE_V3 = dict(
    vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
    encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
    decoder_ffn_dim=5120, max_source_positions=1500, max_target_positions=448)
BLIP_LARGE_TEXT = dict(
    vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512)
BLIP_LARGE_VISION = dict(  # ViT-L/16 at 384x384
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=384, patch_size=16)
SAM2_HIERA_LARGE = dict(  # transformers' SAM2 conversion script, "hiera_large"
    hidden_size=144, embed_dim_per_stage=[144, 288, 576, 1152],
    num_attention_heads_per_stage=[2, 4, 8, 16], blocks_per_stage=[2, 6, 36, 4],
    global_attention_blocks=[23, 33, 43], window_positional_embedding_background_size=[7, 7],
    window_size_per_stage=[8, 4, 16, 8])
SAM2_LARGE_CHANNELS = [1152, 576, 288, 144]
FLAN_T5_LARGE = dict(  # Parler-TTS large's description encoder
    vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, tie_word_embeddings=False)
PARLER_LARGE_DECODER = dict(  # parler-tts init_large_model.py: DAC's 1024 codes + 64
    vocab_size=1088, max_position_embeddings=4096, num_hidden_layers=30, ffn_dim=6144,
    num_attention_heads=24, num_key_value_heads=24, hidden_size=1536, num_codebooks=9)


# -- building --------------------------------------------------------------------------------

def torch_dtype(entry: ModelEntry) -> Any:
    import torch

    return getattr(torch, entry.dtype)


def clip_text(spec: dict, projection: bool = False) -> Any:
    """A CLIP text tower over the tiny tokenizer's ids (its eos, the highest, is what CLIP
    pools); it always reads 77 positions, so its cost is the real one."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipelines._diffusion import TINY_VOCAB

    config = CLIPTextConfig(**spec, **CLIP_TEXT_COMMON, bos_token_id=TINY_VOCAB - 2,
                            eos_token_id=TINY_VOCAB - 1, pad_token_id=TINY_VOCAB - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def save_diffusers(pipe: Any, entry: ModelEntry, model_dir: Path) -> None:
    from pipelines._diffusion import save_pipeline

    pipe.to(torch_dtype(entry))
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        save_pipeline(pipe, folder)


def sdxl(entry: ModelEntry, model_dir: Path, device: str) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from pipelines._diffusion import sd_scheduler_config, tiny_tokenizer

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        parts = dict(vae=AutoencoderKL(**SD_VAE, up_block_types=("UpDecoderBlock2D",) * 4,
                                       sample_size=1024, scaling_factor=0.13025),
                     text_encoder=clip_text(CLIP_L_TEXT),
                     text_encoder_2=clip_text(CLIP_BIGG_TEXT, projection=True))
    pipe = StableDiffusionXLPipeline(
        **parts, unet=unet, tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(pad_token="!"),
        scheduler=EulerDiscreteScheduler(**sd_scheduler_config(), prediction_type="epsilon"),
        image_encoder=None, feature_extractor=None)
    save_diffusers(pipe, entry, model_dir)
    if "vae" in entry.components:  # the fp16-fix VAE: the same architecture, no fp32 upcast
        vae = entry.components["vae"]
        with writing_snapshot(model_dir, vae.repo) as folder:
            parts["vae"].register_to_config(force_upcast=False)
            parts["vae"].save_pretrained(folder)
    if entry.kind == "sdxl-lightning":  # the step-distilled UNet file beside the base
        from safetensors.torch import save_file

        source = entry.components["unet"]
        with writing_snapshot(model_dir, source.repo) as folder:
            save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
                      folder / source.file)


def sd15(entry: ModelEntry, model_dir: Path, device: str) -> None:
    """SD1.5-family kinds: `sd` (text-to-image) and `pix2pix` (8 UNet in-channels)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    from pipelines._diffusion import sd_scheduler_config, tiny_tokenizer

    pix2pix = entry.kind == "pix2pix"
    with torch.device(device):
        parts = dict(unet=UNet2DConditionModel(**{**SD15_UNET, "in_channels": 8 if pix2pix else 4}),
                     vae=AutoencoderKL(**SD_VAE, up_block_types=("UpDecoderBlock2D",) * 4,
                                       sample_size=512, scaling_factor=0.18215),
                     text_encoder=clip_text(CLIP_L_TEXT))
    cls = StableDiffusionInstructPix2PixPipeline if pix2pix else StableDiffusionPipeline
    scheduler = (EulerAncestralDiscreteScheduler(**sd_scheduler_config()) if pix2pix
                 else PNDMScheduler(**sd_scheduler_config(), skip_prk_steps=True))
    pipe = cls(**parts, tokenizer=tiny_tokenizer(), scheduler=scheduler, safety_checker=None,
               feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    save_diffusers(pipe, entry, model_dir)


def svd(entry: ModelEntry, model_dir: Path, device: str) -> None:
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device(device):
        parts = dict(
            unet=UNetSpatioTemporalConditionModel(**SVD_XT_UNET),
            vae=AutoencoderKLTemporalDecoder(**SD_VAE, sample_size=768, scaling_factor=0.18215),
            image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_H_VISION)))
    scheduler = EulerDiscreteScheduler(  # the SVD repos' scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0,
        sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
        timestep_type="continuous", use_karras_sigmas=True)
    pipe = StableVideoDiffusionPipeline(
        **parts, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224))
    save_diffusers(pipe, entry, model_dir)


def x4_upscaler(entry: ModelEntry, model_dir: Path, device: str) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    from pipelines._diffusion import tiny_tokenizer

    with torch.device(device):
        parts = dict(unet=UNet2DConditionModel(**X4_UNET), vae=AutoencoderKL(**X4_VAE),
                     text_encoder=clip_text(CLIP_H_TEXT))
    pipe = StableDiffusionUpscalePipeline(
        **parts, tokenizer=tiny_tokenizer(),
        low_res_scheduler=DDPMScheduler(beta_start=0.0001, beta_end=0.02,
                                        beta_schedule="scaled_linear"),
        scheduler=DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                prediction_type="v_prediction", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350)
    save_diffusers(pipe, entry, model_dir)


def safety_checker(entry: ModelEntry, model_dir: Path, device: str) -> None:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    with torch.device(device):
        checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=CLIP_L_VISION,
                                                          projection_dim=768))
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        checker.to(torch_dtype(entry)).save_pretrained(folder)
        CLIPImageProcessor(crop_size=224, size=224).save_pretrained(folder)


def whisper_tokenizer() -> Any:
    """Whisper's token layout at full size: 50257 text tokens (the byte alphabet, then fillers
    no text encodes to), the special tokens (100 languages), then the 1501 timestamps."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from pipelines._tokens import byte_symbols

    specials = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in LANGUAGES),
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                "<|nospeech|>", "<|notimestamps|>"]
    vocab = {char: i for i, char in enumerate(byte_symbols())}
    while len(vocab) < WHISPER_LARGE_V3["vocab_size"] - len(specials) - 1501:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True)
        for t in specials]})
    tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False,
                                     normalized=False) for i in range(1501)])
    assert len(tokenizer) == WHISPER_LARGE_V3["vocab_size"], len(tokenizer)
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in specials}


def whisper(entry: ModelEntry, model_dir: Path, device: str) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    tokenizer, ids = whisper_tokenizer()
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(**WHISPER_LARGE_V3, pad_token_id=eot, bos_token_id=eot,
                           eos_token_id=eot, decoder_start_token_id=sot,
                           begin_suppress_tokens=[eot], suppress_tokens=[])
    with torch.device(device):
        model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(  # large-v3's generation_config.json, in short
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=True, max_length=448, max_initial_timestamp_index=50,
        lang_to_id={f"<|{c}|>": ids[f"<|{c}|>"] for c in LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        begin_suppress_tokens=[eot], suppress_tokens=[],
        alignment_heads=[[7, 0], [10, 17], [12, 18], [13, 12], [16, 1], [17, 14], [19, 11],
                         [21, 4], [24, 1], [25, 6]])
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                                 tokenizer=tokenizer)
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        model.to(torch_dtype(entry)).save_pretrained(folder)
        processor.save_pretrained(folder)


def blip(entry: ModelEntry, model_dir: Path, device: str) -> None:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from pipelines.image_to_text import TINY_WORDS

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    # BERT's layout: [PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103.
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             *letters, *(f"##{c}" for c in letters), *(w for w in TINY_WORDS if w not in letters)]
    vocab += [f"[filler{i}]" for i in range(len(vocab), BLIP_LARGE_TEXT["vocab_size"] - 2)]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    text = BlipTextConfig(**BLIP_LARGE_TEXT, projection_dim=768,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.sep_token_id,
                          sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    config = BlipConfig(text_config=text.to_dict(),
                        vision_config=BlipVisionConfig(**BLIP_LARGE_VISION).to_dict(),
                        projection_dim=512, image_text_hidden_size=256)
    with torch.device(device):
        model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 384, "width": 384}),
        tokenizer=tokenizer)
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        model.to(torch_dtype(entry)).save_pretrained(folder)
        processor.save_pretrained(folder)


def sam2(entry: ModelEntry, model_dir: Path, device: str) -> None:
    import torch
    from transformers import Sam2Config, Sam2Model
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig

    vision = Sam2VisionConfig(backbone_config=Sam2HieraDetConfig(**SAM2_HIERA_LARGE),
                              backbone_channel_list=SAM2_LARGE_CHANNELS)
    with torch.device(device):
        model = Sam2Model(Sam2Config(vision_config=vision.to_dict()))
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        model.to(torch_dtype(entry)).save_pretrained(folder)


def parler(entry: ModelEntry, model_dir: Path, device: str) -> None:
    """Parler-TTS large v1: flan-T5-large description encoder, a 30-layer decoder over 9 DAC
    codebooks, the 44.1 kHz DAC codec (needs .venv-tts: parler_tts and descript-audio-codec)."""
    import torch
    from parler_tts import (
        DACConfig,
        ParlerTTSConfig,
        ParlerTTSDecoderConfig,
        ParlerTTSForConditionalGeneration,
    )
    from transformers import T5Config

    from pipelines.text_to_speech import quiet_parler, tiny_tokenizer

    quiet_parler()
    codes = DACConfig().codebook_size
    decoder = ParlerTTSDecoderConfig(**PARLER_LARGE_DECODER, pad_token_id=codes,
                                     eos_token_id=codes, bos_token_id=codes + 1)
    config = ParlerTTSConfig(
        text_encoder=T5Config(**FLAN_T5_LARGE).to_dict(), audio_encoder=DACConfig().to_dict(),
        decoder=decoder.to_dict(), vocab_size=FLAN_T5_LARGE["vocab_size"], pad_token_id=codes,
        decoder_start_token_id=codes + 1)
    with torch.device(device):
        model = ParlerTTSForConditionalGeneration(config)
    generation = model.generation_config
    generation.decoder_start_token_id = generation.bos_token_id = codes + 1
    generation.pad_token_id = generation.eos_token_id = codes
    generation.do_sample, generation.guidance_scale = True, 1
    generation.max_length = None  # random weights never stop: every piece is PARLER_FRAMES
    generation.max_new_tokens = generation.min_new_tokens = PARLER_FRAMES
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer's files live there until saved
        tokenizer = tiny_tokenizer(Path(tmp))
        with writing_snapshot(model_dir, entry.main.repo) as folder:
            model.to(torch_dtype(entry)).save_pretrained(folder)
            tokenizer.save_pretrained(folder)


BUILDERS: dict[str, Callable[[ModelEntry, Path, str], None]] = {
    "sdxl": sdxl, "sdxl-lightning": sdxl, "sd": sd15, "pix2pix": sd15, "svd": svd,
    "sd-x4-upscaler": x4_upscaler, "clip-safety-checker": safety_checker, "whisper": whisper,
    "blip": blip, "sam2-hf": sam2, "parler": parler,
}


def supported(entry: ModelEntry) -> bool:
    return entry.kind in BUILDERS


def build(entry: ModelEntry, model_dir: Path, device: str) -> float | None:
    """Write `entry`'s full-size random checkpoint into `model_dir` unless it is already
    there (a --weights-dir kept from an earlier run); the seconds it took, None if reused."""
    import torch

    if ModelFiles(model_dir).present(entry.sources()):
        return None
    if not supported(entry):
        raise SystemExit(f"--full-size has no architecture for {entry.id} (kind {entry.kind}); "
                         f"kinds it builds: {', '.join(sorted(BUILDERS))}")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    torch.manual_seed(0)
    BUILDERS[entry.kind](entry, model_dir, device)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - started
