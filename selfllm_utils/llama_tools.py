"""llama.cpp's own tools, each in a child process: its converter (knowing the course's smoke
tokenizers), its quantizer, and llama-cpp-python's OpenAI-compatible server.

    python -m selfllm_utils.llama_tools convert CONVERTER_DIR STOP_IDS MODEL_DIR --outfile F --outtype f16
    python -m selfllm_utils.llama_tools quantize IN.gguf OUT.gguf Q4_K_M
    python -m selfllm_utils.llama_tools serve --config_file SERVER.json

The converter names a BPE tokenizer's pre-tokenizer (how text is split before merging) by
hashing the ids it gives a test text, and refuses a hash it has not seen. The real DeepSeek,
GLM-4 and Qwen tokenizers are known to it; the smoke stand-ins' tokenizers were trained here
(smoke.build_tokenizer), so their hash is new, though they split text in a way llama.cpp
implements: GPT-2's byte-level regex ("gpt-2") or, loaded as a Qwen2 model's tokenizer, Qwen's
regex ("qwen2"). Only a tokenizer.json whose pre-tokenizer is exactly one of those is mapped
(KNOWN_PRE_TOKENIZERS), so llama.cpp splits a prompt as transformers does (tests/test_deploy.py
compares the ids); any other unknown tokenizer is still refused.

Two settings go into the file's metadata through gguf-py's own `SpecialVocab`: every stop id of
the family (STOP_IDS, comma-separated) fills the end-of-sequence, end-of-turn and end-of-message
slots, which llama.cpp all treats as "end of generation" (the converter alone writes only the
tokenizer's eos, so a Qwen or GLM-4 model served from it could talk on past `<|endoftext|>` or
`<|observation|>`); and add_bos_token is false, as the course's prompts are the chat template's
text, which writes the begin token itself where the family has one (DeepSeek): a runtime that
added one more would start every prompt with two. Everything else is the converter itself.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


# Pre-tokenizers (tokenizer.json) that llama.cpp implements, by its name for them. Transformers
# writes the first for a tokenizer it keeps as trained (the DeepSeek and GLM-4 stand-ins, SmolLM2
# built from its GGUF) and the second when it loads a tokenizer of a Qwen2 model (the Qwen1.5
# stand-in): its Qwen2 tokenizer class brings Qwen's own split regex.
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
KNOWN_PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
}


def _without_trim(pre: dict) -> dict:
    """trim_offsets changes character offsets only, not the tokens."""
    if pre.get("type") == "Sequence":
        return {**pre, "pretokenizers": [_without_trim(p) for p in pre.get("pretokenizers", [])]}
    return {k: v for k, v in pre.items() if k != "trim_offsets"}


def pre_tokenizer_name(model_dir: Path) -> str | None:
    """llama.cpp's name for the way the folder's tokenizer splits text, if it implements it."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    pre = _without_trim(json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {})
    return next((name for name, known in KNOWN_PRE_TOKENIZERS.items() if pre == known), None)


STOP_SLOTS = ("eos", "eot", "eom")  # the GGUF keys llama.cpp reads as end of generation


def quantize(source: str, target: str, kind: str) -> None:
    """llama.cpp's quantizer through llama-cpp-python's binding; exits non-zero on failure."""
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}", None)
    if ftype is None:
        raise SystemExit(f"{kind} is not a llama.cpp quantization type")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    failed = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if failed:
        raise SystemExit(f"llama_model_quantize returned {failed} for {kind}")


def detokenize_long_pieces() -> None:
    """Let llama-cpp-python turn tokens longer than 32 bytes back into text.

    llama-cpp-python 0.3.36 (`_internals.LlamaModel.detokenize`) gives every token a 32-byte
    buffer and silently drops a longer piece (llama.cpp returns the size it needs, negative).
    The smoke stand-ins' small vocabularies have tokens of whole Chinese phrases (39 bytes
    and more), so served answers lost words while their tokens were right (found by
    tests/test_deploy.py). This asks again with the size llama.cpp says it needs.
    """
    import ctypes

    import llama_cpp
    from llama_cpp import _internals

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        output = b""
        for token in tokens:
            size = 32
            while True:
                buffer = (ctypes.c_char * size)()
                n = llama_cpp.llama_token_to_piece(self.vocab, llama_cpp.llama_token(token),
                                                   buffer, size, 0, special)
                if n >= 0:
                    output += bytes(buffer[:n])
                    break
                size = -n
        # as the original: no leading space after a begin-of-sentence token
        if tokens and tokens[0] == self.token_bos() and output[:1] == b" ":
            return output[1:]
        return output

    _internals.LlamaModel.detokenize = detokenize


def serve(argv: list[str]) -> None:
    """llama-cpp-python's server (`python -m llama_cpp.server`), long tokens fixed."""
    detokenize_long_pieces()
    from llama_cpp.server.__main__ import main

    sys.argv = ["llama_cpp.server", *argv]
    main()


def convert(argv: list[str]) -> None:
    converter, stop_ids, model_dir = Path(argv[0]), [int(i) for i in argv[1].split(",")], Path(argv[2])
    sys.path[:0] = [str(converter), str(converter / "gguf-py")]
    import gguf  # the converter's own gguf-py

    from conversion import base  # the converter's own package, beside its script

    original_add = gguf.SpecialVocab.add_to_gguf

    def add_to_gguf(self, writer, quiet: bool = False) -> None:
        missing = [i for i in stop_ids if i not in {self.special_token_ids.get(s) for s in STOP_SLOTS}]
        free = [s for s in STOP_SLOTS if s not in self.special_token_ids]
        if len(missing) > len(free):
            raise SystemExit(f"stop ids {stop_ids} need more than the GGUF's {len(STOP_SLOTS)} slots")
        self.special_token_ids.update(zip(free, missing))
        self.add_special_token.update(bos=False, eos=False)
        original_add(self, writer, quiet)

    gguf.SpecialVocab.add_to_gguf = add_to_gguf

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_name(model_dir)
            if name is None:
                raise
            base.logger.warning(f"unknown tokenizer hash; tokenizer.json splits as {name}")
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    script = converter / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "quantize":
        quantize(*args)
    elif command == "serve":
        serve(args)
    else:
        convert(args)
