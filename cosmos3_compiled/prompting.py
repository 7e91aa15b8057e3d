"""Cosmos3 prompt augmentation and tokenization, without transformers.

Cosmos3 has no separate text encoder: the transformer's text tower reads token ids. The ids must equal
what diffusers' `Cosmos3OmniPipeline.tokenize_prompt` produces, which is

    chat_template([system?, user(prompt + metadata sentences)], add_generation_prompt=True)
    -> encode without adding special tokens -> + [eos, <|vision_start|>]

for the conditional prompt and, with the "is not" sentences, for the negative prompt. Here the BPE runs
on the `tokenizers` library and the chat template on a jinja2 sandbox set up like transformers' one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from cosmos3_compiled.checkpoint_io import CheckpointError

# Text the model was trained with; "give prompt" is verbatim.
SYSTEM_PROMPT_VIDEO = "You are a helpful assistant who will generate videos from a give prompt."
SYSTEM_PROMPT_IMAGE = "You are a helpful assistant who will generate images from a give prompt."

# Metadata sentences appended to the prompt; the negative prompt gets the "is not" forms.
DURATION_TEMPLATE = "The video is {duration:.1f} seconds long and is of {fps:.0f} FPS."
NEGATIVE_DURATION_TEMPLATE = "The video is not {duration:.1f} seconds long and is not of {fps:.0f} FPS."
VIDEO_RESOLUTION_TEMPLATE = "This video is of {height}x{width} resolution."
NEGATIVE_VIDEO_RESOLUTION_TEMPLATE = "This video is not of {height}x{width} resolution."
IMAGE_RESOLUTION_TEMPLATE = "This image is of {height}x{width} resolution."
NEGATIVE_IMAGE_RESOLUTION_TEMPLATE = "This image is not of {height}x{width} resolution."

VISION_START_TOKEN = "<|vision_start|>"

BUILTIN_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

# Named special-token attributes transformers passes to every chat template.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# What transformers' Qwen2Tokenizer uses for a named token that its config does not mention at all.
_QWEN2_DEFAULT_TOKENS = {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


# --------------------------------------------------------------------------------------------------
# Chat template rendering
# --------------------------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

    def _passthrough(self, caller):
        return caller()


class _GuardedNamespace(jinja2.utils.Namespace):
    """`namespace()` for templates, refusing underscore names so a template cannot reach Python internals."""

    def __init__(*args, **kwargs):  # noqa: N805 - same calling convention as jinja2's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _GuardedNamespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key, value):
        _GuardedNamespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key):
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template namespace attribute {key!r} starts with '_'")


class _DictMaker:
    """`dict(...)` and `dict.fromkeys(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes; chat templates expect plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in an environment equivalent to transformers' `apply_chat_template` one."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictMaker()
    env.globals["namespace"] = _GuardedNamespace
    return env.from_string(source)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):  # AddedToken serialised as {"content": ..., ...}
        return value.get("content")
    return str(value)


def _read_json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def _pick_chat_template(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # Several named templates: a list of {"name", "template"} (or a mapping); the default one is used.
    named = dict(value) if isinstance(value, Mapping) else {t["name"]: t["template"] for t in value}
    if "default" not in named:
        raise CheckpointError(f"{path} has chat templates {sorted(named)} but none named 'default'")
    return named["default"]


class PromptTokenizer:
    """A Qwen-style `text_tokenizer/` folder: byte-level BPE from tokenizer.json plus the chat template."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, special_tokens: Mapping[str, str], *, source=None):
        self.source = source
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template)
        self.special_tokens = dict(special_tokens)
        eos = self.special_tokens.get("eos_token")
        if eos is None:
            raise CheckpointError(f"tokenizer {source or ''} defines no eos_token; Cosmos3 prompts end with it")
        self.eos_token = eos
        self.eos_token_id = self.token_id(eos)
        self.vision_start_id = self.token_id(VISION_START_TOKEN)

    @classmethod
    def from_folder(cls, folder: str | Path) -> PromptTokenizer:
        """Load `tokenizer.json` + chat template (`chat_template.jinja`, else `tokenizer_config.json`)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(
                f"text tokenizer folder {folder} does not exist (expected <checkpoint>/text_tokenizer)"
            )
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(
                f"missing {tokenizer_file}: the text tokenizer must be saved in the `tokenizers` JSON format"
            )
        config_file = folder / "tokenizer_config.json"
        config = _read_json_file(config_file) if config_file.is_file() else {}

        # transformers reads chat_template.jinja in preference to the copy in tokenizer_config.json.
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _pick_chat_template(config.get("chat_template"), config_file)
        if not chat_template:
            raise CheckpointError(
                f"no chat template in {folder}: expected chat_template.jinja "
                f"or a 'chat_template' key in {config_file.name}"
            )

        special_tokens = cls._special_tokens(folder, config)
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # The pipeline never pads or truncates, whatever tokenizer.json was saved with.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        return cls(tokenizer, chat_template, special_tokens, source=folder)

    @classmethod
    def builtin(cls) -> PromptTokenizer:
        """The small tokenizer shipped for the embedded debug model (see tools/make_tokenizer.py)."""
        return cls.from_folder(BUILTIN_TOKENIZER_DIR)

    @staticmethod
    def _special_tokens(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
        values = {k: config[k] for k in _NAMED_SPECIAL_TOKENS if k in config}
        legacy_map = folder / "special_tokens_map.json"
        if legacy_map.is_file() and "added_tokens_decoder" not in config:
            for key, value in _read_json_file(legacy_map).items():
                if key in _NAMED_SPECIAL_TOKENS and key not in values:
                    values[key] = value
        if str(config.get("tokenizer_class", "")).startswith("Qwen2Tokenizer"):
            for key, value in _QWEN2_DEFAULT_TOKENS.items():
                values.setdefault(key, value)
        return {k: text for k, v in values.items() if (text := _token_text(v)) is not None}

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added/special tokens (the embedding table needs at least this many)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        idx = self._tokenizer.token_to_id(token)
        if idx is None:
            raise CheckpointError(f"token {token!r} is not in the vocabulary of tokenizer {self.source or ''}")
        return idx

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """The chat template's text for `messages`; `kwargs` become template variables (e.g. add_vision_id)."""
        if not messages:
            raise ValueError("cannot render a chat template for an empty conversation")
        # Messages are copied and keys with None values dropped, as transformers does before rendering.
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        return self._template.render(
            messages=plain, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
        )

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`; special-token strings in it map to their ids, nothing is added around it."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs
    ) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


# --------------------------------------------------------------------------------------------------
# Cosmos3 prompt ids
# --------------------------------------------------------------------------------------------------


def _join_sentence(text: str, sentence: str) -> str:
    # Trailing full stops of the running text are dropped and exactly one ". " separates the sentence.
    text = text.rstrip(".")
    return f"{text}. {sentence}" if text else sentence


def augment_prompt(
    text: str,
    *,
    negative: bool,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    add_resolution_template: bool = True,
    add_duration_template: bool = True,
) -> str:
    """`text` with the duration sentence (video only) and the resolution sentence appended."""
    is_image = num_frames == 1
    if add_duration_template and not is_image:
        template = NEGATIVE_DURATION_TEMPLATE if negative else DURATION_TEMPLATE
        text = _join_sentence(text, template.format(duration=num_frames / fps, fps=fps))
    if add_resolution_template:
        if is_image:
            template = NEGATIVE_IMAGE_RESOLUTION_TEMPLATE if negative else IMAGE_RESOLUTION_TEMPLATE
        else:
            template = NEGATIVE_VIDEO_RESOLUTION_TEMPLATE if negative else VIDEO_RESOLUTION_TEMPLATE
        text = _join_sentence(text, template.format(height=height, width=width))
    return text


def build_prompt_ids(
    tokenizer: PromptTokenizer,
    prompt: str,
    negative_prompt: str | None,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    use_system_prompt: bool = True,
    add_resolution_template: bool = True,
    add_duration_template: bool = True,
) -> tuple[list[int], list[int]]:
    """Token ids of the conditional and unconditional (negative) text, each ending in eos, <|vision_start|>.

    The two sequences have their own lengths (no padding). `num_frames == 1` selects image mode: image
    system prompt and resolution sentence, no duration sentence. A None negative prompt counts as "". The
    request was checked before (`request.build_request`: non-empty prompt, positive fps, 4k+1 frames).
    """
    if negative_prompt is None:
        negative_prompt = ""

    is_image = num_frames == 1
    system_prompt = SYSTEM_PROMPT_IMAGE if is_image else SYSTEM_PROMPT_VIDEO
    suffix = [tokenizer.eos_token_id, tokenizer.vision_start_id]
    sizes = dict(
        num_frames=num_frames,
        height=height,
        width=width,
        fps=fps,
        add_resolution_template=add_resolution_template,
        add_duration_template=add_duration_template,
    )

    def ids_for(text: str) -> list[int]:
        messages = [{"role": "system", "content": system_prompt}] if use_system_prompt else []
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=False) + suffix

    cond_ids = ids_for(augment_prompt(prompt, negative=False, **sizes))
    uncond_ids = ids_for(augment_prompt(negative_prompt, negative=True, **sizes))
    return cond_ids, uncond_ids
