"""TORCH_COMPILE (go-livepeer's optimisation flag): the UNet and VAE decoder are compiled in
place and warmed up at the served size while /health says LOADING, requests are served by the
compiled modules, and the compiled kernels land in the persistent cache under MODEL_DIR."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import serving

MODELS = Path(__file__).resolve().parent.parent / "support" / "compile_models.yaml"


def test_torch_compile_compiles_at_load_and_persists_its_kernels(tmp_path, monkeypatch):
    cache_dir = tmp_path / "tiny" / ".cache" / "torchinductor"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")  # restored after the test
    with serving("text-to-image", tmp_path / "tiny", models_file=MODELS,
                 torch_compile=True) as client:
        service = client.app.state.service
        model = service.cache.resident(service.registry.default("text-to-image"))
        unet, decoder = model.pipe.unet, model.pipe.vae.decoder
        assert unet._compiled_call_impl is not None and decoder._compiled_call_impl is not None
        r = client.post("/text-to-image", json={"prompt": "a cat", "seed": 3})
        assert r.status_code == 200, r.text
        assert client.get("/version").status_code == 200
    assert cache_dir.is_dir() and any(cache_dir.rglob("*")), "no compiled kernels persisted"
