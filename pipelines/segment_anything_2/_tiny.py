"""The tiny random-weight checkpoints for CPU mode, in the layouts both loaders read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.segment_anything_2._pt_backend import official_model, sam2_available
from runner.errors import ModelLoadError
from runner.hub import writing_snapshot
from runner.registry import ModelEntry

# The config measured in ../shared/notes/tiny-models-transformers.md ("d. SAM2 via
# transformers"): a 64x64 input, 16x16 low-res masks.

def tiny_parts() -> dict[str, Any]:
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    backbone = Sam2HieraDetConfig(
        hidden_size=8, image_size=[64, 64], blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 2],
        # Block 3 is stage 3's second block: a global block on a stage's first (q-pooling)
        # block fails with ZeroDivisionError (window 0).
        global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
    return {
        "vision_config": Sam2VisionConfig(
            backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
            backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=32).to_dict(),
        "prompt_encoder_config": Sam2PromptEncoderConfig(
            hidden_size=32, image_size=64, patch_size=16, mask_input_channels=8).to_dict(),
        "mask_decoder_config": Sam2MaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
            iou_head_hidden_dim=32).to_dict(),
    }


def tiny_transformers_model() -> Any:
    """A random-weight SAM2 video model, the layout facebook/sam2.1-* ship (model_type
    sam2_video), so the tiny mode loads what the real snapshots hold."""
    import torch
    from transformers import Sam2VideoConfig, Sam2VideoModel

    torch.manual_seed(0)
    config = Sam2VideoConfig(
        **tiny_parts(), image_size=64, num_maskmem=2, memory_attention_hidden_size=32,
        memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[4, 4], memory_encoder_hidden_size=32,
        memory_encoder_output_channels=16, memory_fuser_embed_dim=32,
        memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1,
        # At the default 0.02 the random logits are ~1e-4, all 0.000 at 3 decimals; at 0.2 they
        # are ~0.1-0.4 and the three masks' scores differ, so the tests can tell them apart.
        initializer_range=0.2)
    return Sam2VideoModel(config).eval()


# Its own file, so the config reads as the yaml it is; read when a tiny sam2-pt is built.
TINY_OFFICIAL_YAML = Path(__file__).with_name("tiny_official.yaml")


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    """sam2-hf: a Hugging Face format snapshot. sam2-pt: the official layout (yaml + .pt with
    {"model": state_dict}), which needs the sam2 package to build."""
    if entry.kind == "sam2-pt":
        if not sam2_available():
            raise ModelLoadError(f"{entry.id} (kind sam2-pt): a tiny official checkpoint needs "
                                 "the `sam2` package and torchvision (the segment-anything-2 "
                                 "image)")
        import torch

        torch.manual_seed(0)
        config = TINY_OFFICIAL_YAML.read_text()
        state = official_model(config).state_dict()
        with writing_snapshot(model_dir, entry.main.repo) as folder:
            (folder / "sam2_tiny_random.yaml").write_text(config)
            torch.save({"model": state}, folder / "sam2_tiny_random.pt")
        return
    model = tiny_transformers_model()
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        model.save_pretrained(folder)
