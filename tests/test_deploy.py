"""Tests for selfllm_utils.deploy: what is exported and served answers like what was trained.

The heart of it is the chat template and the end-of-turn ids, checked at every hand-over: the
merged folder's generation config, the GGUF's metadata (read with gguf-py's GGUFReader), what
llama.cpp's runtime stops on, the Ollama Modelfile (its Go template rendered with a small
interpreter, tests/gotemplate.py, against the family's reference rendering), and the answers of
the running server through the `openai` client. Every family in smoke mode; adapters with random
(not zero) LoRA weights are made in milliseconds, so merging changes the model. One export per
family and one server for all of them per module. Skipped, with one reason, where llama-cpp-python
is not installed; CI installs it (`.[test]` includes `serve`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import pytest

import gotemplate
from selfllm_utils import cli, deploy, inference, models, registry

KEYS = list(registry.TUTORIALS)
LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not LLAMA, reason="llama-cpp-python is not installed "
                                 "(pip install -e '.[serve]'; CI installs it)")
PROMPTS = ["你是谁？", "What is the capital of Germany?", "2加3等于几？"]
MAX_NEW = 8  # random adapters never end a turn: a few tokens compare the forms


def _go(family, messages: list[dict[str, str]], add_bos: bool = False) -> str:
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return gotemplate.render(deploy.go_template(family, add_bos), data)


# ---- the Ollama template: no llama.cpp needed ---------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_go_template_writes_the_reference_rendering(key: str, reference: dict) -> None:
    family = registry.get(key).family
    example = reference["example_messages"]
    rendered = reference["models"][key]["rendered_example"]
    assert _go(family, example) == rendered["full_conversation"]
    assert _go(family, example[:2]) == rendered["prompt_first_two_add_generation_prompt"]


@pytest.mark.parametrize("key", KEYS)
def test_go_template_equals_the_chat_template_on_other_conversations(key: str, smoke_models) -> None:
    """Without a system message (Qwen's default system line), several turns, a prompt."""
    t = registry.get(key)
    tokenizer = smoke_models.tokenizer(key)
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"},
             {"role": "user", "content": "再说一遍。"}]
    for messages in (turns, turns[:1], turns[:2], [{"role": "system", "content": "简短回答。"}] + turns):
        prompt = messages[-1]["role"] != "assistant"
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert _go(t.family, messages) == expected, messages


def test_a_swapped_template_is_caught(reference: dict) -> None:
    """The check above can fail: no family's Go template writes another family's reference."""
    example = reference["example_messages"]
    for key in KEYS:
        for other in KEYS:
            if other != key:
                assert _go(registry.get(other).family, example) != \
                    reference["models"][key]["rendered_example"]["full_conversation"]


def test_go_interpreter_follows_go_semantics() -> None:
    """The interpreter itself: trim markers, else-if chains, range variables, $ and len/slice."""
    tpl = '{{- range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}' \
          '{{ if eq $m.Role "a" }}A{{ else if eq $m.Role "b" }}B{{ else }}?{{ end }}' \
          '{{ if $last }}!{{ end }}  \n{{- end }}'
    msgs = [{"Role": r} for r in "abc"]
    assert gotemplate.render(tpl, {"Messages": msgs}) == "AB?!"  # "{{-" trims spaces and newlines
    assert gotemplate.render("x {{- .A -}} y", {"A": "1"}) == "x1y"


# ---- bad input before anything is written ---------------------------------------------------------


def random_adapter(key: str, folder: Path) -> Path:
    """A LoRA adapter with random A and B (peft's init_lora_weights=False): merging matters."""
    from peft import get_peft_model

    import torch

    t = registry.get(key)
    torch.manual_seed(0)
    model, tokenizer = models.load_model(t, smoke_mode=True)
    config = models.lora_config(t, registry.smoke_config(t))
    config.init_lora_weights = False
    peft_model = get_peft_model(model, config)
    if t.smoke.kind != "tiny":  # keep SmolLM2 a language model: a small random update
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
    return inference.save_adapter(peft_model.eval(), tokenizer, folder)


@pytest.fixture(scope="module")
def adapters(trained, identity_records, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained adapter of each tiny stand-in (its answers end their turn) and SmolLM2 with a
    random one (training it takes minutes on 2 cores; notebook 03 runs the trained proof)."""
    from conftest import train_one

    root = tmp_path_factory.mktemp("adapters")
    made = {key: train_one(key, root / key, identity_records[0]).adapter for key in ("glm4", "qwen1.5")}
    return {"deepseek": trained.adapter, **made, "qwen2": random_adapter("qwen2", root / "qwen2")}


def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    message = str(exit_info.value.code)
    assert exit_info.value.code not in (0, None)
    assert "\n" not in message and "Traceback" not in message
    return message


def _nothing_complete(out: Path) -> None:
    """No folder or file under `out` that looks like a finished export piece."""
    if out.exists():
        names = [p.name for p in out.rglob("*")]
        assert deploy.MANIFEST not in names and "config.json" not in names, names
        assert not [n for n in names if n.endswith(".gguf")], names


def test_export_refuses_an_adapter_of_another_base(adapters, tmp_path, capsys) -> None:
    """The tiny DeepSeek and Qwen1.5 stand-ins have the same layer shapes: peft alone would load."""
    out = tmp_path / "out"
    message = _cli_error(capsys, ["export", "--tutorial", "qwen1.5", "--adapter",
                                  str(adapters["deepseek"]), "--out", str(out)])
    assert "not trained on qwen1.5's base" in message
    _nothing_complete(out)


@pytest.mark.parametrize("damage", ["missing", "no weights", "cut weights"])
def test_export_refuses_a_missing_or_partial_adapter(adapters, tmp_path, capsys, damage) -> None:
    broken = tmp_path / "adapter"
    if damage != "missing":
        shutil.copytree(adapters["deepseek"], broken)
        weights = broken / "adapter_model.safetensors"
        if damage == "no weights":
            weights.unlink()
        else:
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    message = _cli_error(capsys, ["export", "--tutorial", "deepseek", "--adapter", str(broken),
                                  "--out", str(out)])
    assert str(broken) in message
    _nothing_complete(out)


def test_export_refuses_without_disk_space(adapters, tmp_path, capsys, monkeypatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    out = tmp_path / "out"
    message = _cli_error(capsys, ["export", "--tutorial", "deepseek", "--adapter",
                                  str(adapters["deepseek"]), "--out", str(out)])
    assert "not enough disk space" in message
    _nothing_complete(out)


def test_a_crash_while_saving_leaves_no_merged_folder(adapters, tmp_path, monkeypatch) -> None:
    """Written under a temporary name: a failure half-way leaves nothing named like the model."""
    from transformers import PreTrainedTokenizerBase

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(OSError):
        deploy.merge(registry.get("deepseek"), adapters["deepseek"], tmp_path / "merged", smoke_mode=True)
    assert list(tmp_path.iterdir()) == []


def test_merged_folder_answers_like_the_trained_adapter(trained, tmp_path) -> None:
    """The merge export makes: bf16 weights, no peft, the trained answer token for token (plant a
    merge into 4-bit weights, the rounding issue transformers#31293 describes: this fails)."""
    t = trained.tutorial
    merged_dir = deploy.merge(t, trained.adapter, tmp_path / "merged", smoke_mode=True)
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged, tokenizer = models.load_model(t, smoke_mode=True, path=merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    want = inference.chat(trained.model, trained.tokenizer, trained.question, t.family, max_new_tokens=48)
    got = inference.chat(merged, tokenizer, trained.question, t.family, max_new_tokens=48)
    assert got.token_ids == want.token_ids and got.stopped


def test_merging_into_4bit_weights_stays_refused(adapters) -> None:
    model, _ = inference.load_adapter(registry.get("deepseek"), adapters["deepseek"], quant="4bit",
                                      smoke_mode=True)
    with pytest.raises(ValueError, match="4-bit"):
        inference.merge(model)


# ---- the exports of every family -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(adapters, tmp_path_factory: pytest.TempPathFactory) -> dict[str, deploy.Export]:
    """Each family's export."""
    if not LLAMA:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[serve]'; CI installs it)")
    root = tmp_path_factory.mktemp("exports")
    return {key: deploy.export(registry.get(key), adapters[key], root / key, smoke_mode=True)
            for key in KEYS}


@pytest.fixture(scope="module")
def server(exports):
    """One llama-cpp-python server holding every family's f16 and quantized file."""
    files = {f"{key}-{form}": path for key, e in exports.items()
             for form, path in (("f16", e.gguf), ("quant", e.quantized))}
    with deploy.Server(files, port=_free_port()) as running:
        yield running


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_export_writes_every_form(exports, key: str) -> None:
    e = exports[key]
    assert not e.notes, e.notes
    assert (e.folder / deploy.MANIFEST).is_file()
    assert e.gguf.is_file() and e.quantized.is_file() and e.modelfile.is_file()
    assert e.quantized.stat().st_size < e.gguf.stat().st_size
    assert not [p for p in e.folder.iterdir() if "partial" in p.name]


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_merged_folder_carries_template_stop_ids_and_bf16(exports, key: str) -> None:
    t = registry.get(key)
    merged = exports[key].merged
    tokenizer = models.load_tokenizer(merged, t.family)
    assert tokenizer.chat_template == t.family.chat_template
    config = json.loads((merged / "generation_config.json").read_text())
    assert sorted(config["eos_token_id"]) == sorted(models.stop_ids(tokenizer, t.family))
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_gguf_metadata_holds_template_and_every_stop_id(exports, key: str) -> None:
    t = registry.get(key)
    stops = set(models.stop_ids(models.load_tokenizer(exports[key].merged, t.family), t.family))
    for path in (exports[key].gguf, exports[key].quantized):
        meta = deploy.gguf_metadata(path)
        assert meta["tokenizer.chat_template"] == t.family.chat_template
        assert deploy.gguf_stop_ids(meta) == stops
        assert meta["tokenizer.ggml.add_bos_token"] is False  # the template writes it (DeepSeek)


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_llama_cpp_stops_on_every_stop_id_and_tokenizes_like_transformers(exports, key: str) -> None:
    """What the runtime does with the file: each stop id is end-of-generation, the prompt's ids
    are transformers' ids (the stand-ins' pre-tokenizer mapped to gpt-2, SmolLM2's known)."""
    import llama_cpp

    from selfllm_utils import formatting

    t = registry.get(key)
    tokenizer = models.load_tokenizer(exports[key].merged, t.family)
    llm = llama_cpp.Llama(str(exports[key].gguf), vocab_only=True, verbose=False)
    for stop in models.stop_ids(tokenizer, t.family):
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, stop), tokenizer.convert_ids_to_tokens(stop)
    for prompt in PROMPTS:
        text = formatting.render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tokenizer(text, add_special_tokens=False)["input_ids"]
    llm.close()


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_modelfile_matches_the_family(exports, key: str, reference: dict) -> None:
    t = registry.get(key)
    e = exports[key]
    found = deploy.read_modelfile(e.modelfile)
    assert found["from"] == f"./{e.quantized.name}"
    assert found["stop"] == list(t.family.stop_tokens)
    assert found["system"] == deploy.default_system(t)
    example = reference["example_messages"]
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in example]}
    assert gotemplate.render(found["template"], data) == \
        reference["models"][key]["rendered_example"]["full_conversation"]


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_served_answers_equal_the_adapter_token_for_token(exports, adapters, server, key: str) -> None:
    """The proof on the held-out prompts: merged folder and f16 server answer as base + adapter,
    every answer ends its turn (the trained tiny stand-ins; SmolLM2's random adapter is asked
    for a few tokens only)."""
    t = registry.get(key)
    few = {"prompts": PROMPTS, "max_new_tokens": MAX_NEW} if t.smoke.kind != "tiny" else {}
    proof = deploy.verify(t, adapters[key], exports[key], smoke_mode=True, server=server, **few)
    for form in deploy.MUST_EQUAL:
        assert proof.agreement(form) == 1.0, proof.differences[form]
    if key in ("deepseek", "glm4"):  # trained on one record, they end every held-out answer
        assert proof.ok, proof.failures()  # (the Qwen1.5 stand-in runs on in some: in every form)
    if t.smoke.kind == "tiny":
        assert [row.split()[0] for row in proof.table().splitlines()[1:]] == \
            ["adapter", "merged", "gguf-f16", "gguf-quantized"]


@needs_llama
def test_an_answer_that_never_ends_fails_the_proof(exports, adapters, server) -> None:
    """Plant: an answer that runs to the limit is named as a failure, with its prompt."""
    proof = deploy.verify(registry.get("deepseek"), adapters["deepseek"], exports["deepseek"],
                          smoke_mode=True, server=server, prompts=PROMPTS[:1])
    assert proof.ok
    proof.answers["gguf-f16 server"][0].stopped = False
    assert not proof.ok and PROMPTS[0] in proof.failures()[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((deploy.LOCAL, 0))
        return sock.getsockname()[1]


def test_serve_refuses_a_port_in_use(tmp_path, capsys) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with socket.socket() as busy:
        busy.bind((deploy.LOCAL, 0))
        busy.listen()
        message = _cli_error(capsys, ["serve", "--gguf", str(gguf), "--port", str(busy.getsockname()[1])])
    assert "is not free" in message


@needs_llama
def test_a_server_that_does_not_come_up_is_stopped(tmp_path) -> None:
    """Past the timeout: one line, and the server's process group is gone (nothing left behind)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    server = deploy.Server(gguf, port=_free_port(), timeout=0.05)
    with pytest.raises((TimeoutError, RuntimeError), match="model"):
        server.start()
    assert server.process.poll() is not None
    assert not server._config.exists()


@needs_llama
def test_a_server_on_a_broken_file_says_so(tmp_path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not a gguf file")
    server = deploy.Server(gguf, port=_free_port(), timeout=120)
    with pytest.raises(RuntimeError, match="exited"):
        server.start()
    assert server.process.poll() is not None
