"""The naive baseline for scripts/bench.py --naive: each pipeline's plain library default path
on the same weights folder the runner served, in the same process: `from_pretrained` in
float32 (asked for explicitly: a float16 snapshot would otherwise load some parts at half),
the library's default attention, no batching, no caches, outputs encoded as a plain server
would (PNG at PIL's default compression, json.dumps). The request's settings (size, steps,
guidance, the scheduler and the components the model's entry names: the fp16-fix VAE, a
Lightning UNet file) are the ones the runner ran with, so the ratio compares implementations,
not settings, and the outputs can be compared (scripts/bench_fidelity.py). No runner code runs
here except argument filtering and naming the scheduler."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_inputs
from bench_inputs import Call, Options

Run = Callable[[int], Any]


@dataclass
class Context:
    pipeline: str
    entry: Any  # the runner's ModelEntry: its defaults, fixed values and options
    folder: Path
    device: str
    options: Options
    calls: Callable[[int], Call]
    files: Any = None  # the runner's ModelFiles over the same MODEL_DIR: component folders

    def value(self, key: str, explicit: Any = None, fallback: Any = None) -> Any:
        """A setting as the runner resolved it: fixed, else sent, else the model's default."""
        if key in self.entry.fixed:
            return self.entry.fixed[key]
        if explicit is not None:
            return explicit
        return self.entry.defaults.get(key, fallback)

    def model_options(self) -> Any:
        """The entry's typed options, read as the runner reads them."""
        return bench_inputs.spec_of(self.pipeline).hooks.options.of(self.entry)

    def field(self, name: str) -> Any:
        """A field of the pipeline's sample request, so the naive call uses the same text."""
        return bench_inputs.sample(self.pipeline, self.options).fields[name]

    def image(self, index: int = 0) -> Any:
        from PIL import Image

        return Image.open(io.BytesIO(self.calls(index).files["image"][1])).convert("RGB")

    def generator(self) -> Any:
        import torch

        return torch.Generator(self.device).manual_seed(1)


def context(pipeline: str, options: Options, model_dir: Path, device: str) -> Context:
    """The naive path's view of `pipeline`'s model (`options.model`, else its default) in
    `model_dir`, resolved as the runner resolves it."""
    from runner.hub import ModelFiles
    from runner.registry import Registry
    from runner.settings import Settings

    files = ModelFiles(model_dir)
    entry = Registry.load(Settings().models_file).resolve(pipeline, options.model)
    return Context(pipeline, entry, files.folder(entry.main.repo, entry.main.revision), device,
                   options, lambda i: bench_inputs.request(pipeline, options, i), files)


def safety_checker(folder: Path, device: str) -> Any:
    """The safety checker as the plain libraries load it: its model and its image processor."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPImageProcessor

    checker = StableDiffusionSafetyChecker.from_pretrained(folder, **float32()).to(device)
    return checker, CLIPImageProcessor.from_pretrained(folder)


def png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # PIL's default compression (level 6)
    return buf.getvalue()


def float32() -> dict[str, Any]:
    """The libraries' float32, asked for explicitly: a snapshot saved in float16 otherwise
    loads its transformers parts at the config's dtype (transformers 5's "auto"), beside a
    float32 UNet (a dtype error) or as a half-precision "naive" baseline."""
    import torch
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": torch.float32}


def diffusers_pipe(cls: Any, c: Context) -> Any:
    """A diffusers pipeline from the folder, in float32 on the device, without progress bars,
    with the components and the scheduler the model's entry names."""
    import torch

    from pipelines._diffusion import set_scheduler

    parts = {name: loader(c) for name, loader in COMPONENTS.items()
             if name in c.entry.components}
    pipe = cls.from_pretrained(c.folder, dtype=torch.float32, **parts).to(c.device)
    # image-to-video takes no scheduler option: its checkpoint's own runs
    set_scheduler(pipe, getattr(c.model_options(), "scheduler", None))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def component_vae(c: Context) -> Any:
    import torch
    from diffusers import AutoencoderKL

    source = c.entry.components["vae"]
    return AutoencoderKL.from_pretrained(c.files.folder(source.repo, source.revision),
                                         dtype=torch.float32)


def component_unet(c: Context) -> Any:
    """A step-distilled UNet file (SDXL-Lightning) in the base UNet's architecture."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    source = c.entry.components["unet"]
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(c.folder / "unet"))
    unet.load_state_dict(load_file(c.files.file(source.repo, source.file, source.revision)))
    return unet.to(torch.float32)


COMPONENTS = {"vae": component_vae, "unet": component_unet}


def text_to_image(c: Context) -> Run:
    from diffusers import AutoPipelineForText2Image

    pipe = diffusers_pipe(AutoPipelineForText2Image, c)
    size = c.value("width", c.options.size)
    args = dict(prompt=c.field("prompt"), width=size, height=size,
                num_inference_steps=c.value("num_inference_steps", c.options.steps, 50),
                guidance_scale=c.value("guidance_scale", None, 5.0),
                num_images_per_prompt=c.options.images)
    return lambda i: [png(im) for im in pipe(**args, generator=c.generator()).images]


def image_to_image(c: Context) -> Run:
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

    from pipelines._diffusion import accepted

    cls = DiffusionPipeline if c.entry.kind == "pix2pix" else AutoPipelineForImage2Image
    pipe = diffusers_pipe(cls, c)
    args = accepted(pipe, dict(
        prompt="make it snowy", image=c.image(),
        num_inference_steps=c.value("num_inference_steps", c.options.steps, 50),
        guidance_scale=c.value("guidance_scale", None, 7.5),
        image_guidance_scale=c.value("image_guidance_scale", None, 1.5),
        strength=c.value("strength", None, 0.8), num_images_per_prompt=c.options.images))
    return lambda i: [png(im) for im in pipe(**args, generator=c.generator()).images]


def image_to_video(c: Context) -> Run:
    from diffusers import StableVideoDiffusionPipeline

    pipe = diffusers_pipe(StableVideoDiffusionPipeline, c)
    image = c.image()
    args = dict(width=c.value("width", c.options.size, 1024),
                height=c.value("height", c.options.size, 576),
                num_frames=c.model_options().num_frames or 25,
                num_inference_steps=c.value("num_inference_steps", c.options.steps, 25),
                fps=c.value("fps", None, 7),
                motion_bucket_id=c.value("motion_bucket_id", None, 127),
                noise_aug_strength=c.value("noise_aug_strength", None, 0.02),
                # a setting of the model's entry: the temporal VAE's output depends on it
                decode_chunk_size=c.model_options().decode_chunk_size)
    return lambda i: [png(f) for f in pipe(image, **args, generator=c.generator()).frames[0]]


def upscale(c: Context) -> Run:
    from diffusers import StableDiffusionUpscalePipeline

    pipe = diffusers_pipe(StableDiffusionUpscalePipeline, c)
    image = c.image()
    steps = c.value("num_inference_steps", c.options.steps, 75)
    return lambda i: [png(im) for im in pipe(prompt=c.field("prompt"), image=image,
                                              num_inference_steps=steps,
                                              generator=c.generator()).images]


def audio_to_text(c: Context) -> Run:
    import numpy as np
    import soundfile
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(c.folder), device=c.device,
                   **float32())
    samples, rate = soundfile.read(io.BytesIO(c.calls(0).files["audio"][1]), dtype="float32")
    audio = {"raw": np.asarray(samples), "sampling_rate": rate}
    return lambda i: json.dumps(asr(dict(audio), return_timestamps=True))


def image_to_text(c: Context) -> Run:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(c.folder)
    model = BlipForConditionalGeneration.from_pretrained(c.folder, **float32()).to(c.device)
    model.eval()
    image = c.image()
    tokens = c.model_options().max_new_tokens

    def run(i: int) -> str:
        inputs = processor(images=image, return_tensors="pt").to(c.device)
        return processor.decode(model.generate(**inputs, max_new_tokens=tokens)[0],
                                skip_special_tokens=True)

    return run


def segment_anything_2(c: Context) -> Run:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipelines import segment_anything_2 as sam2
    from runner.device import Device

    class Float32(Device):  # the runner's reader of SAM2 snapshots, at float32
        def dtype(self, name: str) -> Any:
            return torch.float32

    model = sam2.transformers_model(c.folder, c.entry, Float32(c.device.split(":")[0]))
    side = model.config.vision_config.backbone_config.image_size
    side = tuple(side) if isinstance(side, (list, tuple)) else (side, side)
    prompt_size = model.config.prompt_encoder_config.image_size
    mean = torch.tensor(sam2.IMAGENET_MEAN, device=c.device).view(1, 3, 1, 1)
    std = torch.tensor(sam2.IMAGENET_STD, device=c.device).view(1, 3, 1, 1)

    def run(i: int) -> str:
        pixels = np.array(c.image(i))
        height, width = pixels.shape[:2]
        x = torch.from_numpy(pixels).to(c.device).permute(2, 0, 1)[None].float() / 255
        x = (F.interpolate(x, size=side, mode="bilinear", antialias=True) - mean) / std
        point = torch.tensor([[[[0.5 * prompt_size, 0.5 * prompt_size]]]], device=c.device)
        with torch.inference_mode():
            out = model(pixel_values=x, input_points=point,
                        input_labels=torch.ones((1, 1, 1), dtype=torch.long, device=c.device))
        low = out.pred_masks[0, 0].float()
        masks = F.interpolate(low[None], size=(height, width), mode="bilinear")[0]
        return json.dumps({"masks": masks.cpu().numpy().tolist(),
                           "scores": out.iou_scores[0, 0].float().cpu().numpy().tolist(),
                           "logits": low.cpu().numpy().tolist()})

    return run


def text_to_speech(c: Context) -> Run:
    import soundfile
    from parler_tts import ParlerTTSForConditionalGeneration
    from transformers import AutoTokenizer

    model = ParlerTTSForConditionalGeneration.from_pretrained(c.folder, **float32())
    model.to(c.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(c.folder)
    description = tokenizer(c.field("description"), return_tensors="pt").to(c.device)
    text = tokenizer(c.field("text"), return_tensors="pt").to(c.device)

    def run(i: int) -> bytes:
        audio = model.generate(input_ids=description.input_ids,
                               prompt_input_ids=text.input_ids).float().cpu().numpy()
        buf = io.BytesIO()
        soundfile.write(buf, audio.reshape(-1), model.config.sampling_rate, format="WAV")
        return buf.getvalue()

    return run


def llm(c: Context) -> Run:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(c.folder)
    model = AutoModelForCausalLM.from_pretrained(c.folder, **float32()).to(c.device).eval()
    prompt = tokenizer.apply_chat_template(c.calls(0).json["messages"], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to(c.device)
    tokens = c.options.max_tokens

    def run(i: int) -> str:  # greedy, as the bench asks the runner (temperature 0)
        out = model.generate(**prompt, max_new_tokens=tokens, do_sample=False)
        return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)

    return run


NAIVE: dict[str, Callable[[Context], Run]] = {
    "text-to-image": text_to_image, "image-to-image": image_to_image,
    "image-to-video": image_to_video, "upscale": upscale, "audio-to-text": audio_to_text,
    "image-to-text": image_to_text, "segment-anything-2": segment_anything_2,
    "text-to-speech": text_to_speech, "llm": llm,
}


def measure(c: Context, requests: int) -> dict:
    """Load time, a first call and `requests` steady calls of the naive path, in ms; an
    exception (an out-of-memory error, typically) is reported instead of raised."""
    import torch

    cuda = c.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        started = time.perf_counter()
        run = NAIVE[c.pipeline](c)
        load_s = time.perf_counter() - started
        times, output = [], None
        for i in range(requests + 1):
            started = time.perf_counter()
            output = run(i)
            times.append((time.perf_counter() - started) * 1000)
    except Exception as exc:  # noqa: BLE001 - the baseline failing is a result
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    # last_output: the answer to the same request as the runner's last (never written out)
    result = {"load_s": load_s, "first_ms": times[0], "steady_ms": times[1:],
              "last_output": output}
    if cuda:
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result
