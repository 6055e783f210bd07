"""The tiny random-weight chat model for CPU mode, in the layout the transformers backend
loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.hub import writing_snapshot
from runner.registry import ModelEntry

# The config measured in ../shared/notes/tiny-models-transformers.md ("e. Llama chat"), with
# 1024 positions so a conversation and the default 256 new tokens fit.

TINY_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>",
                 "<|end|>"]
TINY_CORPUS = [
    "Hello! How are you today? I am fine, thank you.",
    "I am a tiny language model with random weights, so my answers are noise.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a story about a cat and a dog who live on a small boat.",
]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_chat_model() -> tuple[Any, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TINY_CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=TINY_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # Sampling by default: greedy decoding of random weights repeats one token forever.
    model.generation_config.update(do_sample=True, temperature=0.7, top_p=1.0, top_k=None,
                                   max_new_tokens=32)
    return model, tokenizer


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model, tokenizer = tiny_chat_model()
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
