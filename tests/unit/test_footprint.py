"""runner.footprint: sizes from safetensors headers, which files count, measured module bytes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from runner.footprint import estimate, measure, safetensors_bytes, weight_files
from runner.hub import ModelFiles, writing_snapshot
from runner.registry import ModelEntry


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def touch_weights(path: Path, numel: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(numel)}, path)
    return path


# -- safetensors headers -------------------------------------------------------------------------

def test_safetensors_bytes_matches_saved_tensors(tmp_path):
    floats = {"w": torch.randn(3, 5), "b": torch.randn(7), "scalar": torch.tensor(1.5)}
    ints = {"ids": torch.arange(11, dtype=torch.int64), "mask": torch.ones(6, dtype=torch.bool),
            "bytes": torch.zeros(2, 3, dtype=torch.uint8), "i32": torch.zeros(4, dtype=torch.int32)}
    path = tmp_path / "model.safetensors"
    save_file({**floats, **ints}, path, metadata={"format": "pt"})
    assert safetensors_bytes(path, float_bytes=4) == nbytes(floats) + nbytes(ints)
    # Cast to half: every float halves, integers and booleans keep their size.
    assert safetensors_bytes(path, float_bytes=2) == nbytes(floats) // 2 + nbytes(ints)


def test_safetensors_bytes_casts_half_and_double_floats_too(tmp_path):
    tensors = {"h": torch.zeros(10, dtype=torch.float16),
               "bf": torch.zeros(6, dtype=torch.bfloat16),
               "d": torch.zeros(3, dtype=torch.float64)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path)
    assert safetensors_bytes(path, float_bytes=2) == (10 + 6 + 3) * 2
    assert safetensors_bytes(path, float_bytes=4) == (10 + 6 + 3) * 4


def test_safetensors_bytes_reads_only_the_header(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(1000, 100)}, path)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # corrupt every weight byte: only the header may be read
        f.seek(size - 400_000)
        f.write(b"\xff" * 400_000)
    assert safetensors_bytes(path, float_bytes=4) == 400_000


# -- which files count ---------------------------------------------------------------------------

def names(files: list[Path], root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in files}


@pytest.fixture
def pipeline_folder(tmp_path) -> Path:
    for rel in ["unet/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.fp16.safetensors",
                "text_encoder/model.safetensors",  # no fp16 file in this one
                "text_encoder_2/model.fp16.safetensors"]:  # only the fp16 file here
        touch_weights(tmp_path / rel)
    (tmp_path / "model_index.json").write_text("{}")
    return tmp_path


def test_weight_files_prefers_the_variant(pipeline_folder):
    assert names(weight_files(pipeline_folder, "fp16"), pipeline_folder) == {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.fp16.safetensors",
    }


@pytest.mark.parametrize("variant", [None, "bf16"])
def test_weight_files_ignores_variant_files_otherwise(pipeline_folder, variant):
    assert names(weight_files(pipeline_folder, variant), pipeline_folder) == {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    }


def test_weight_files_keeps_plain_shards(tmp_path):
    for i in (1, 2):
        touch_weights(tmp_path / f"unet/diffusion_pytorch_model-0000{i}-of-00002.safetensors")
    assert len(weight_files(tmp_path, "fp16")) == 2
    assert len(weight_files(tmp_path, None)) == 2


def test_weight_files_finds_sharded_variant_files(tmp_path):
    for i in (1, 2):
        touch_weights(tmp_path / f"text_encoder_3/model.fp16-0000{i}-of-00002.safetensors")
    touch_weights(tmp_path / "unet/diffusion_pytorch_model.fp16.safetensors")
    assert len(weight_files(tmp_path, "fp16")) == 3


def test_estimate_sums_main_folder_and_single_file_components(tmp_path):
    entry = ModelEntry(id="org/lightning", kind="sdxl-lightning", variant="fp16",
                       source={"repo": "org/base"},
                       components={"unet": {"repo": "org/unets", "file": "two.safetensors"}})
    with writing_snapshot(tmp_path, "org/base") as folder:
        (folder / "vae").mkdir()
        save_file({"w": torch.zeros(100)}, folder / "vae" / "x.safetensors")
        save_file({"w": torch.zeros(999)}, folder / "vae" / "x.fp16.safetensors")
        (folder / "vae" / "config.json").write_text("{}")
    with writing_snapshot(tmp_path, "org/unets") as folder:
        save_file({"w": torch.zeros(50)}, folder / "two.safetensors")
        save_file({"w": torch.zeros(7000)}, folder / "eight.safetensors")  # not this model's
    files = ModelFiles(tmp_path)
    assert estimate(entry, files, float_bytes=2) == (999 + 50) * 2
    assert estimate(entry.model_copy(update={"variant": None}), files, 4) == (100 + 50) * 4


# -- measured bytes ------------------------------------------------------------------------------

def test_measure_module_counts_parameters_and_buffers():
    module = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20))
    expected = sum(t.numel() * t.element_size()
                   for t in [*module.parameters(), *module.buffers()])
    assert measure(module) == expected
    assert measure(module.half()) < expected


def test_measure_counts_each_module_once_across_containers():
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(4, 2)
    size_a, size_b = measure(a), measure(b)
    assert size_a == (64 + 8) * 4 and size_b == (8 + 2) * 4
    assert measure({"a": a, "b": b}) == size_a + size_b
    assert measure({"a": a, "again": a, "list": [a, b]}) == size_a + size_b
    holder = SimpleNamespace(pipe=SimpleNamespace(unet=a, vae=b, name="x", steps=4), other=a)
    assert measure(holder) == size_a + size_b


def test_measure_counts_tied_parameters_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 16)
            self.head = torch.nn.Linear(16, 100, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    assert measure(model) == 100 * 16 * 4
    # Two modules sharing one tensor, reached through a container.
    first = torch.nn.Linear(16, 16, bias=False)
    second = torch.nn.Linear(16, 16, bias=False)
    second.weight = first.weight
    assert measure([first, second]) == 16 * 16 * 4


def test_measure_of_nothing_is_zero():
    assert measure(None) == 0
    assert measure({"name": "x", "n": 3}) == 0


def test_measure_counts_plain_tensors_once():
    """A model held as plain tensors (the echo test pipeline's load() result) has a size too."""
    weights = {"w": torch.zeros(1000), "h": torch.zeros(10, dtype=torch.float16)}
    assert measure({"id": "test/echo", "weights": weights}) == 4000 + 20
    module = torch.nn.Linear(10, 10, bias=False)
    assert measure({"module": module, "same": module.weight}) == 400


def test_pickled_checkpoints_count_by_file_size(tmp_path):
    from runner.footprint import file_bytes, weight_files

    (tmp_path / "model.pt").write_bytes(b"\0" * 4000)
    assert weight_files(tmp_path, None) == [tmp_path / "model.pt"]
    assert file_bytes(tmp_path / "model.pt", 2) == 2000


def test_models_held_elsewhere_report_their_own_bytes():
    from runner.footprint import measure

    class Daemon:
        def resident_bytes(self):
            return 1234

    assert measure(Daemon()) == 1234


def test_component_folders_a_model_replaces_are_not_counted(tmp_path):
    """SDXL-Lightning reads its UNet from one file and every SDXL entry its VAE from the
    fp16-fix repo: the base snapshot's unet/ and vae/ weights are never loaded."""
    from safetensors.torch import save_file

    from runner.footprint import estimate
    from runner.hub import ModelFiles, writing_snapshot
    from runner.registry import ModelEntry

    def weights(folder, name, numel):
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(numel)}, folder / name)

    with writing_snapshot(tmp_path, "org/base") as base:
        for part, numel in (("unet", 1000), ("vae", 100), ("text_encoder", 10)):
            weights(base / part, "diffusion_pytorch_model.safetensors", numel)
    with writing_snapshot(tmp_path, "org/lightning") as repo:
        weights(repo, "unet.safetensors", 1000)
    with writing_snapshot(tmp_path, "org/vae") as repo:
        weights(repo, "diffusion_pytorch_model.safetensors", 100)
    entry = ModelEntry(id="org/x", kind="sdxl-lightning", source={"repo": "org/base"},
                       components={"unet": {"repo": "org/lightning", "file": "unet.safetensors"},
                                   "vae": {"repo": "org/vae"}})
    assert estimate(entry, ModelFiles(tmp_path), 4) == (1000 + 100 + 10) * 4
