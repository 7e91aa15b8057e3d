"""Prompt ids: ours (tokenizers + jinja2) against diffusers' Cosmos3OmniPipeline.tokenize_prompt."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest

from cosmos3_compiled.checkpoint_io import CheckpointError
from cosmos3_compiled.prompting import BUILTIN_TOKENIZER_DIR, PromptTokenizer, build_prompt_ids

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from reference import builtin_vocab_size, load_reference_pipeline, make_reference_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    return make_reference_checkpoint(tmp_path_factory.mktemp("cosmos3_ref"), layers=1)


@pytest.fixture(scope="module")
def reference_pipe(reference_folder):
    return load_reference_pipeline(reference_folder)


@pytest.fixture(scope="module")
def ours(reference_folder):
    return PromptTokenizer.from_folder(reference_folder / "text_tokenizer")


CASES = {
    "video": dict(prompt="A red fox trots across a snowy meadow at sunrise", negative_prompt=None),
    "trailing_dots": dict(prompt="A red fox trots across a snowy meadow...", negative_prompt=None),
    "empty_negative": dict(prompt="A cat sleeps on a windowsill.", negative_prompt=""),
    "negative": dict(prompt="A cat sleeps on a windowsill.", negative_prompt="Blurry, low quality, watermark."),
    "image": dict(
        prompt="A bowl of ramen on a dark table.", negative_prompt="blurry", num_frames=1, height=1024, width=1024
    ),
    "fps16": dict(prompt="A train crosses a bridge", negative_prompt="static", num_frames=93, fps=16.0),
    "fps_fraction": dict(prompt="Waves on a beach", negative_prompt=None, num_frames=121, fps=23.976),
    "no_system": dict(prompt="A dog catches a frisbee.", negative_prompt="bad", use_system_prompt=False),
    "image_no_system": dict(prompt="A lighthouse", negative_prompt=None, num_frames=1, use_system_prompt=False),
    "no_duration": dict(prompt="A kite in the sky.", negative_prompt="dark.", add_duration_template=False),
    "no_resolution": dict(prompt="A kite in the sky.", negative_prompt="dark.", add_resolution_template=False),
    "no_templates": dict(
        prompt="A kite in the sky.", negative_prompt="", add_duration_template=False, add_resolution_template=False
    ),
    "unicode_newlines": dict(
        prompt="Un café à Paris,\n北京的街道 — 🚲  two  spaces\tand tab", negative_prompt="çà\n"
    ),
    "special_token_text": dict(prompt="say <|im_end|> then <|vision_start|> now", negative_prompt="<|endoftext|>"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_ids_match_diffusers(case, ours, reference_pipe):
    kwargs = dict(num_frames=81, height=720, width=1280, fps=24.0)
    kwargs.update(CASES[case])
    ref_cond, ref_uncond = reference_pipe.tokenize_prompt(**kwargs)
    cond, uncond = build_prompt_ids(ours, **kwargs)
    assert cond == ref_cond
    assert uncond == ref_uncond
    # Both sequences end with eos (<|im_end|>) then <|vision_start|>, and are not padded to each other.
    assert cond[-2:] == [ours.eos_token_id, ours.vision_start_id]


def test_prompt_text_layout(ours):
    cond, uncond = build_prompt_ids(ours, "A red fox.", "", num_frames=81, height=720, width=1280, fps=24.0)
    assert ours.decode(cond) == (
        "<|im_start|>system\nYou are a helpful assistant who will generate videos from a give prompt.<|im_end|>\n"
        "<|im_start|>user\nA red fox. The video is 3.4 seconds long and is of 24 FPS. "
        "This video is of 720x1280 resolution.<|im_end|>\n<|im_start|>assistant\n<|im_end|><|vision_start|>"
    )
    negative_text = "The video is not 3.4 seconds long and is not of 24 FPS. This video is not of 720x1280 resolution."
    assert f"<|im_start|>user\n{negative_text}<|im_end|>" in ours.decode(uncond)


def test_builtin_tokenizer_loads_with_transformers():
    ref = transformers.AutoTokenizer.from_pretrained(BUILTIN_TOKENIZER_DIR)
    ours = PromptTokenizer.builtin()
    assert ref.eos_token == "<|im_end|>" == ours.eos_token
    assert ref.eos_token_id == ours.eos_token_id
    assert ref.convert_tokens_to_ids("<|vision_start|>") == ours.vision_start_id
    assert len(ref) == ours.vocab_size
    # The embedded debug model's embedding table (vocab_size) must cover every id.
    assert ours.vocab_size <= builtin_vocab_size() <= 1024
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A red fox."}]
    expected = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ours.apply_chat_template(messages) == expected["input_ids"]


def test_builtin_tokenizer_is_small():
    size = sum(p.stat().st_size for p in BUILTIN_TOKENIZER_DIR.iterdir())
    assert size < 200 * 1024


# A template that depends on trim_blocks / lstrip_blocks, special-token variables, tojson, namespace,
# loop controls and the {% generation %} tag, and that inserts a default system message.
_VARIANT_TEMPLATE = """{% set ns = namespace(seen_system=false) %}
{% for message in messages %}
    {% if message.role == 'system' %}{% set ns.seen_system = true %}{% endif %}
{% endfor %}
{% if not ns.seen_system %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
    {% if message.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' ~ message.role) }}
    {% endif %}
<|im_start|>{{ message.role }}
{% if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}{% else %}{{ message.content }}{% endif %}{{ eos_token }}
{% if loop.last and extra is defined %}{{ extra | tojson }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


@pytest.fixture
def variant_folder(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(BUILTIN_TOKENIZER_DIR, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": _VARIANT_TEMPLATE},
        {"name": "other", "template": "unused"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "messages, kwargs",
    [
        ([{"role": "user", "content": "A red fox."}], {}),
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "two\n\nlines  "}], {"add_vision_id": False}),
        (
            [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}],
            {"extra": {"é": [1, "<b>"]}},
        ),
    ],
)
def test_chat_template_environment_matches_transformers(variant_folder, messages, kwargs):
    ref = transformers.AutoTokenizer.from_pretrained(variant_folder)
    ours = PromptTokenizer.from_folder(variant_folder)
    for add_generation_prompt in (True, False):
        text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
        assert ours.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs) == text
        ids = ref.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True, **kwargs
        )["input_ids"]
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs) == ids


def test_chat_template_raise_exception(variant_folder):
    ours = PromptTokenizer.from_folder(variant_folder)
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role narrator"):
        ours.render_chat([{"role": "narrator", "content": "x"}])


def test_missing_tokenizer_folder(tmp_path):
    missing = tmp_path / "nope" / "text_tokenizer"
    with pytest.raises(CheckpointError, match=str(missing)):
        PromptTokenizer.from_folder(missing)


def test_missing_tokenizer_files(tmp_path):
    folder = tmp_path / "text_tokenizer"
    shutil.copytree(BUILTIN_TOKENIZER_DIR, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no chat template"):
        PromptTokenizer.from_folder(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=str(folder / "tokenizer.json")):
        PromptTokenizer.from_folder(folder)


def test_reference_checkpoint_layout(reference_folder):
    index = json.loads((reference_folder / "model_index.json").read_text())
    assert index["_class_name"] == "Cosmos3OmniPipeline"
    assert (reference_folder / "scheduler" / "scheduler_config.json").is_file()
    assert list((reference_folder / "transformer").glob("*.safetensors"))
    assert list((reference_folder / "vae").glob("*.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (reference_folder / "text_tokenizer" / name).read_bytes() == (BUILTIN_TOKENIZER_DIR / name).read_bytes()
