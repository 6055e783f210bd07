"""pipelines._diffusion request helpers: LoRA parsing, seeds, prompt splitting."""

from __future__ import annotations

import json

import pytest

from pipelines._diffusion import MAX_LORAS, adapter_name, parse_loras, prompt_kwargs, seeds
from runner.errors import BadRequest

# -- LoRAs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_no_loras(text):
    assert parse_loras(text) == {}


def test_valid_loras_become_floats():
    loras = parse_loras('{"latent-consistency/lcm-lora-sdxl": 1, "nerijs/pixel-art-xl": 1.2, '
                        '"solo": 0}')
    assert loras == {"latent-consistency/lcm-lora-sdxl": 1.0, "nerijs/pixel-art-xl": 1.2,
                     "solo": 0.0}
    assert all(type(w) is float for w in loras.values())
    assert list(loras) == ["latent-consistency/lcm-lora-sdxl", "nerijs/pixel-art-xl", "solo"]


def test_max_loras_is_accepted():
    text = json.dumps({f"org/l{i}": 0.5 for i in range(MAX_LORAS)})
    assert len(parse_loras(text)) == MAX_LORAS


@pytest.mark.parametrize("text", [
    "{not json", "{'org/a': 1.0}", '["org/a", 1.0]', '"org/a"', "1.0", "null",
    json.dumps({f"org/l{i}": 1.0 for i in range(MAX_LORAS + 1)}),
    '{"org/a": -0.5}', '{"org/a": true}', '{"org/a": false}', '{"org/a": "1.0"}',
    '{"org/a": null}', '{"org/a": [1.0]}', '{"org/a": NaN}', '{"org/a": Infinity}',
    '{"org/a": -Infinity}', '{"org/a": 1e400}',
    '{"../x": 1.0}', '{"http://x/y": 1.0}', '{"/abs/path": 1.0}', '{"a/b/c": 1.0}',
    '{"": 1.0}', '{"org/..": 1.0}',
])
def test_bad_loras_are_400(text):
    with pytest.raises(BadRequest) as info:
        parse_loras(text)
    assert info.value.status_code == 400


def test_adapter_names_are_identifiers():
    assert adapter_name("nerijs/pixel-art-xl") == "nerijs_pixel_art_xl"
    assert adapter_name("a/b.c").isidentifier()


# -- seeds ---------------------------------------------------------------------------------------

def test_given_seed_counts_up():
    assert seeds(7, 3) == [7, 8, 9]
    assert seeds(0, 1) == [0]


def test_random_seed_is_32_bit_and_consecutive():
    drawn = [seeds(None, 3) for _ in range(50)]
    for first, second, third in drawn:
        assert 0 <= first < 2**32
        assert (second, third) == (first + 1, first + 2)
    assert len({d[0] for d in drawn}) > 1  # actually random


# -- prompts -------------------------------------------------------------------------------------

class TwoEncoders:
    def __call__(self, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                 height=None):
        pass


class OneEncoder:
    def __call__(self, prompt=None, negative_prompt=None, height=None):
        pass


class ThreeEncoders:
    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, negative_prompt=None,
                 negative_prompt_2=None, negative_prompt_3=None):
        pass


def test_two_encoders_split_prompt_and_negative():
    assert prompt_kwargs(TwoEncoders(), "a cat | oil painting", "x|y") == {
        "prompt": "a cat", "prompt_2": "oil painting",
        "negative_prompt": "x", "negative_prompt_2": "y",
    }


def test_two_encoders_with_one_part_fill_only_the_first_slot():
    assert prompt_kwargs(TwoEncoders(), "a cat", "") == {"prompt": "a cat"}
    assert prompt_kwargs(TwoEncoders(), "a cat", "blurry") == {
        "prompt": "a cat", "negative_prompt": "blurry"}


def test_one_encoder_keeps_the_text_whole():
    assert prompt_kwargs(OneEncoder(), "a|b", "x|y") == {"prompt": "a|b",
                                                         "negative_prompt": "x|y"}
    assert prompt_kwargs(OneEncoder(), "a|b|c|d", "") == {"prompt": "a|b|c|d"}


def test_three_encoders_take_three_parts():
    assert prompt_kwargs(ThreeEncoders(), "a|b|c", "") == {
        "prompt": "a", "prompt_2": "b", "prompt_3": "c"}


@pytest.mark.parametrize("prompt, negative", [("a|b|c", ""), ("a", "x|y|z")])
def test_more_parts_than_encoders_is_400(prompt, negative):
    with pytest.raises(BadRequest) as info:
        prompt_kwargs(TwoEncoders(), prompt, negative)
    assert "at most 2" in info.value.msg
