"""Build the small built-in text tokenizer that ships with the embedded debug model.

The folder it writes has the layout of a Qwen2-style `text_tokenizer/` component, so that both
`transformers.AutoTokenizer.from_pretrained` (and with it the diffusers reference pipeline) and
`cosmos3_compiled.prompting.PromptTokenizer` can load it offline:

    tokenizer.json          byte-level BPE (Qwen2 normalizer / pre-tokenizer / decoder) + added tokens
    tokenizer_config.json   tokenizer_class, named special tokens, the chat template (for older readers)
    chat_template.jinja     the chat template (what transformers 5 writes and reads first)

The BPE is trained on a short English corpus written below, so the output is reproducible without
any download. Run from the repository root:

    python tools/make_tokenizer.py                      # rewrites cosmos3_compiled/assets/tokenizer
    python tools/make_tokenizer.py --out /tmp/tok --vocab-size 800
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cosmos3_compiled" / "assets" / "tokenizer"

# The split pattern Qwen2 tokenizers use before byte-level mapping; transformers' Qwen2Tokenizer rebuilds
# its pipeline with this pattern, so tokenizer.json must use the same one for both loaders to agree.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Appended after the learned vocabulary, in the order Qwen2-VL numbers them.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# ChatML with Qwen2-VL style media placeholders. Whitespace is produced only by string literals, so the
# output does not depend on trim_blocks / lstrip_blocks. No default system message is inserted.
CHAT_TEMPLATE = (
    "{%- set counts = namespace(images=0, videos=0) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}\n"
    "{{- raise_exception('Unsupported chat role: ' ~ message['role']) -}}\n"
    "{%- endif -%}\n"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] -}}\n"
    "{%- else -%}\n"
    "{%- for part in message['content'] -%}\n"
    "{%- if part['type'] == 'image' or 'image' in part -%}\n"
    "{%- set counts.images = counts.images + 1 -%}\n"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ counts.images ~ ': ' -}}{%- endif -%}\n"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "{%- elif part['type'] == 'video' or 'video' in part -%}\n"
    "{%- set counts.videos = counts.videos + 1 -%}\n"
    "{%- if add_vision_id -%}{{- 'Video ' ~ counts.videos ~ ': ' -}}{%- endif -%}\n"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "{%- elif 'text' in part -%}\n"
    "{{- part['text'] -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

# Training text: scene descriptions in the style of video prompts plus the sentences the Cosmos3
# prompt templates add, so common prompt words become single tokens.
CORPUS = """
You are a helpful assistant who will generate videos from a give prompt.
You are a helpful assistant who will generate images from a give prompt.
The video is 5.0 seconds long and is of 24 FPS. This video is of 720x1280 resolution.
The video is not 3.4 seconds long and is not of 16 FPS. This video is not of 480x832 resolution.
This image is of 1024x1024 resolution. This image is not of 960x960 resolution.
A red fox trots across a snowy meadow at sunrise, its breath visible in the cold air.
A golden retriever runs along a sandy beach while waves roll onto the shore.
A busy city street at night with neon signs reflecting on the wet pavement.
An astronaut floats inside a space station and looks out of a round window at the Earth.
A chef slices fresh vegetables on a wooden cutting board in a bright kitchen.
A small sailboat drifts on a calm blue lake surrounded by green mountains.
A robot arm picks up a yellow cube from a table and places it into a box.
Slow motion footage of a hummingbird hovering next to a pink flower.
A steam train crosses an old stone bridge over a deep river valley.
Two children fly a kite on a windy hill under a clear summer sky.
A close up of coffee being poured into a white cup, steam rising slowly.
Heavy rain falls on a quiet forest path, and drops splash in small puddles.
A drone shot flying over a winding road through autumn trees in orange and red.
A cat sleeps on a sunny windowsill while the curtains move in the breeze.
A group of friends laugh around a campfire under a sky full of stars.
A surfer rides a large wave, spray flying behind the board.
A time lapse of clouds moving over a desert with tall red rocks.
An old man plays the violin in a small park as people walk past.
A car drives through a tunnel with bright lights passing overhead.
A bowl of ramen with noodles, egg and green onions on a dark table.
A ballet dancer spins on a wooden stage lit by a single warm spotlight.
A herd of elephants walks slowly across a dry savanna at sunset.
A futuristic city with flying cars and tall glass towers at dawn.
A hand writes on paper with a black fountain pen, the ink still wet.
Snow falls gently on a small village with lights glowing in every window.
A waterfall pours into a clear pool surrounded by moss and ferns.
A woman in a blue dress walks through a field of tall yellow flowers.
The camera pans left to reveal a lighthouse standing on a rocky cliff.
The camera zooms in on the face of a smiling baby holding a toy.
A static shot of a busy train station with people hurrying to the platform.
A bicycle leans against a brick wall covered in green ivy.
Fireworks explode over a river, their colors reflected in the water below.
A turtle swims above a coral reef full of bright fish.
A farmer drives a tractor across a wide wheat field in the late afternoon.
A paper boat floats down a small stream after the rain.
A modern kitchen with white cabinets and sunlight coming through the window.
A painter adds strokes of blue paint to a large canvas in a studio.
A dog catches a frisbee in mid air in a green park.
A market stall full of oranges, apples, lemons and grapes.
Low angle view of a skyscraper with clouds reflected in its glass.
The scene is realistic, detailed, sharp, with natural lighting and smooth motion.
Blurry, low quality, distorted, jittery, overexposed, watermark, text, bad anatomy.
The video shows a person who opens a door, walks into the room and sits on a chair.
A warehouse robot moves boxes between shelves while a worker checks a tablet.
A first person view of driving on a highway in light traffic during the day.
An egocentric view of hands folding a towel on a bed.
The light changes from morning to evening as shadows move across the floor.
Numbers and sizes: 1 2 3 4 5 6 7 8 9 0, 16x16, 256, 480, 720, 832, 1080, 1280, 1920.
Questions, answers, quotes: "what is this?" 'it is a test' - (yes) [no] {maybe}; done!
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    bpe = models.BPE(
        unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    # Special tokens go after the learned vocabulary (as in Qwen); they are matched before BPE.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 32768,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }


def write_folder(out: Path, vocab_size: int) -> Tokenizer:
    tokenizer = build_tokenizer(vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument(
        "--vocab-size", type=int, default=1000, help="learned BPE vocabulary before the special tokens"
    )
    args = parser.parse_args(argv)
    tokenizer = write_folder(args.out, args.vocab_size)
    total = tokenizer.get_vocab_size(with_added_tokens=True)
    size_kb = sum(p.stat().st_size for p in args.out.iterdir()) / 1024
    print(f"wrote {args.out} ({size_kb:.1f} KB): {total} token ids (0..{total - 1})")


if __name__ == "__main__":
    main()
