"""Tests for selfllm_utils.models: loading (bf16, 4-bit), stop ids, folder checks, LoRA that trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfllm_utils import cache, models, registry

KEY = "deepseek"  # tiny Llama: loads in milliseconds, and bitsandbytes quantises it on the CPU
# LoRA r=8 on the seven projections of a 7-14B model trains about a quarter of a percent.
MAX_TRAINABLE_SHARE_FULL_SIZE = 0.005
MAX_TRAINABLE_SHARE_TINY = 0.15  # the tiny stand-in is mostly embeddings, its layers are 64 wide


def _batch(tokenizer, text: str = "请介绍一下你自己。我是不要葱姜蒜。") -> dict[str, torch.Tensor]:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    return {"input_ids": ids, "labels": ids.clone()}


def test_load_bf16(smoke_models) -> None:
    tutorial = registry.get(KEY)
    model, tokenizer = smoke_models.model(KEY)
    assert model.dtype == models.load_dtype() == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert model.generation_config.eos_token_id == models.stop_ids(tokenizer, tutorial.family)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "right"
    assert torch.isfinite(model(**_batch(tokenizer)).loss)


@pytest.mark.parametrize("quant", ["bf16", "4bit"])
def test_load_fetches_no_hub_kernels(smoke_models, quant: str) -> None:
    """transformers 5.25 kernelizes every model when `kernels` is installed, fetching kernels from
    the Hub at load time: offline on a GPU that load fails. The course keeps the torch path."""
    model, _ = smoke_models.model(KEY, quant=quant)
    assert not model.use_kernels


def test_load_4bit(smoke_models) -> None:
    from bitsandbytes.nn import Linear4bit

    model, tokenizer = smoke_models.model(KEY, quant="4bit")
    assert model.is_loaded_in_4bit
    quantised = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert quantised == set(registry.get(KEY).lora_targets)  # every projection; not lm_head
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant
    with torch.no_grad():
        assert torch.isfinite(model(**_batch(tokenizer)).loss)


def test_load_rejects_unknown_quant() -> None:
    with pytest.raises(ValueError, match="quant must be 'bf16' or '4bit', got '8bit'"):
        models.load_model(registry.get(KEY), quant="8bit", smoke_mode=True)


@pytest.mark.parametrize(("tokenizer_of", "family"), [
    ("deepseek", "qwen2"),  # tokens unknown, no unk token: ids come back as None
    ("qwen1.5", "glm4"),  # some tokens unknown
    ("qwen1.5", "deepseek"),
])
def test_stop_ids_refuses_a_foreign_tokenizer(smoke_models, tokenizer_of: str, family: str) -> None:
    tokenizer = smoke_models.tokenizer(tokenizer_of)
    with pytest.raises(ValueError, match=f"tokenizer lacks a stop token of {family}"):
        models.stop_ids(tokenizer, registry.FAMILIES[family])


@pytest.mark.parametrize("key", list(registry.TUTORIALS))
def test_stop_ids_of_own_family(smoke_models, key: str) -> None:
    """Every family's stop tokens (GLM-4 has three) become the loaded model's eos ids."""
    family = registry.get(key).family
    model, tokenizer = smoke_models.model(key)
    ids = models.stop_ids(tokenizer, family)
    assert len(set(ids)) == len(family.stop_tokens)
    assert tokenizer.convert_ids_to_tokens(ids) == list(family.stop_tokens)
    assert model.generation_config.eos_token_id == ids


# Serving lists also stop ChatML models on <|im_start|>; the course stops on <|im_end|>, which a
# chat answer writes first, and <|endoftext|> (tests/test_formatting.py checks the template).
SERVING_ONLY = {"<|im_start|>"}


@pytest.mark.parametrize("key", list(registry.TUTORIALS))
def test_stop_tokens_are_the_real_models_stop_ids(reference, key: str) -> None:
    """The registry's stop tokens are the real tokenizers' and the serving stacks' stop ids."""
    family = registry.get(key).family
    ref = reference["models"][key]
    serving = dict(zip(ref["serving_stop"]["stop"], ref["serving_stop"]["stop_token_ids"]))
    assert set(family.stop_tokens) == set(serving) - SERVING_ONLY
    real_ids = ref["special_tokens"]["ids"]
    assert [real_ids[t] for t in family.stop_tokens] == [serving[t] for t in family.stop_tokens]
    if key == "glm4":  # GLM-4's generation_config.json: eos_token_id [151329, 151336, 151338]
        assert [real_ids[t] for t in family.stop_tokens] == \
            registry.get(key).reference_config["eos_token_id"]


# --- model folders and downloads -------------------------------------------------------------


def test_check_model_dir_without_config(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="has no config.json"):
        models.check_model_dir(tmp_path)


def test_check_model_dir_remote_code_glm(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    with pytest.raises(RuntimeError, match="glm-4-9b-chat-hf"):
        models.check_model_dir(tmp_path)


def test_check_model_dir_without_weights(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RuntimeError, match="has no weight files"):
        models.check_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert models.check_model_dir(tmp_path) == tmp_path


def test_download_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded with url: /api/v1/models\nlong trace line")

    monkeypatch.setattr(cache, "fetch", offline)
    monkeypatch.setenv("SELFLLM_HOME", str(tmp_path))
    tutorial = registry.get("qwen2")
    with pytest.raises(RuntimeError) as info:
        models.download(tutorial)
    message = str(info.value)
    assert "\n" not in message
    assert tutorial.modelscope_id in message and "ConnectionError" in message
    assert "SELFLLM_SMOKE" in message and "SELFLLM_HOME" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained trace


def test_model_path_in_smoke_mode_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(tutorial):
        raise AssertionError("smoke mode touched the network")

    monkeypatch.setattr(models, "download", no_download)
    path = models.model_path(registry.get(KEY), smoke_mode=True)
    assert (path / "config.json").exists()


# --- LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(registry.TUTORIALS))
def test_lora_share_of_full_size_model(key: str) -> None:
    """What the learner's real run trains, counted on the full-size shape (meta device, no memory)."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    tutorial = registry.get(key)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tutorial.reference_config))
        model = get_peft_model(model, models.lora_config(tutorial, tutorial.config))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable / total < MAX_TRAINABLE_SHARE_FULL_SIZE


def _train_step(peft_model, tokenizer) -> None:
    peft_model.train()
    loss = peft_model(**_batch(tokenizer)).loss
    loss.backward()  # the seeds' "element 0 of tensors does not require grad" would raise here


def _check_lora_grads(peft_model) -> None:
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for p in trainable.values())
    # B starts at zero, so A gets no gradient on the first step, but every B does
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("quant", ["bf16", "4bit"])
def test_add_lora_trains_with_gradient_checkpointing(smoke_models, monkeypatch, quant: str) -> None:
    """The recipe's checkpointing is on, non-reentrant, with the embeddings' output requiring grad.

    Reentrant checkpointing with a frozen base gives the seeds' "element 0 of tensors does not
    require grad". transformers 5.24 and peft 0.21 call `enable_input_require_grads` themselves
    when checkpointing is on, so a training step no longer shows a missing call: the arguments
    are asserted directly (add_lora's own call, the use_reentrant flag of every checkpointed block).
    """
    import inspect

    tutorial = registry.get(KEY)
    cfg = registry.smoke_config(tutorial)
    assert cfg.gradient_checkpointing
    model, tokenizer = smoke_models.model(KEY, quant=quant)
    callers: list[str] = []
    original = type(model).enable_input_require_grads

    def spy(self):
        callers.append(inspect.stack()[1].filename)
        return original(self)

    monkeypatch.setattr(type(model), "enable_input_require_grads", spy)
    peft_model = models.add_lora(model, tutorial, cfg)
    assert models.__file__ in callers  # add_lora (or prepare_4bit) asked for it, not only peft
    base = peft_model.base_model.model
    assert base.is_gradient_checkpointing
    blocks = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
    assert blocks and all(m._gradient_checkpointing_func.keywords == {"use_reentrant": False}
                          for m in blocks)
    layers = list(base.model.layers)
    assert [m for m in blocks if m in layers] == layers[:-1]  # all but the last (see the test below)
    assert base.get_input_embeddings()(_batch(tokenizer)["input_ids"]).requires_grad
    assert peft_model.config.use_cache is False  # no KV cache in training (packing needs it off)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    assert 0 < trainable / total < MAX_TRAINABLE_SHARE_TINY
    _train_step(peft_model, tokenizer)
    _check_lora_grads(peft_model)


def _layer_forwards(peft_model, tokenizer) -> tuple[list[int], torch.Tensor, dict]:
    """One training step: how often each decoder layer ran forward, the loss, the LoRA grads."""
    layers = list(peft_model.base_model.model.model.layers)
    runs = [0] * len(layers)
    # as the MLP starts: a recomputation reruns the layer's forward (not always its own hooks)
    # and stops once it has what backward needs
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
             for i, layer in enumerate(layers)]
    peft_model.train()
    loss = peft_model(**_batch(tokenizer)).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return runs, loss.detach(), grads


@pytest.mark.parametrize("quant", ["bf16", "4bit"])
def test_checkpointing_recomputes_every_layer_but_the_last(smoke_models, quant: str) -> None:
    """Backward recomputes each checkpointed layer once; the last one's forward, which backward
    would repeat right after the loss, is kept instead. Loss and LoRA gradients stay the same."""
    import dataclasses

    tutorial = registry.get(KEY)
    cfg = registry.smoke_config(tutorial)
    model, tokenizer = smoke_models.model(KEY, quant=quant)
    torch.manual_seed(0)
    peft_model = models.add_lora(model, tutorial, cfg)
    for name, p in peft_model.named_parameters():  # non-zero B, so every A gets gradient too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    runs, loss, grads = _layer_forwards(peft_model, tokenizer)
    assert len(runs) > 1 and runs == [2] * (len(runs) - 1) + [1]
    peft_model.base_model.model.model.layers[-1].gradient_checkpointing = True  # all recomputed
    peft_model.zero_grad()
    runs_all, loss_all, grads_all = _layer_forwards(peft_model, tokenizer)
    assert runs_all == [2] * len(runs)
    assert torch.equal(loss, loss_all)
    assert grads.keys() == grads_all.keys() and all(torch.equal(grads[n], grads_all[n]) for n in grads)
    # offloaded activations: the last layer is recomputed too, or all it saves would go to host memory
    offloaded = dataclasses.replace(cfg, offload_activations=True)
    model, tokenizer = smoke_models.model(KEY, quant=quant)
    runs, _, _ = _layer_forwards(models.add_lora(model, tutorial, offloaded), tokenizer)
    assert runs == [2] * len(runs)


@pytest.mark.parametrize("quant", ["bf16", "4bit"])
def test_lora_trains_after_the_model_answered_once(smoke_models, quant: str) -> None:
    """A notebook lets the base model answer before LoRA: every adapter must still get gradient.

    bitsandbytes repacks 4-bit weights on a CPU's first no-grad forward into a layout with no
    backward; models.load_model keeps the training layout (`_keep_4bit_trainable_on_cpu`).
    """
    tutorial = registry.get(KEY)
    model, tokenizer = smoke_models.model(KEY, quant=quant)
    with torch.no_grad():
        model(**_batch(tokenizer))
    peft_model = models.add_lora(model, tutorial, registry.smoke_config(tutorial))
    _train_step(peft_model, tokenizer)
    _check_lora_grads(peft_model)


def test_add_lora_without_checkpointing(smoke_models) -> None:
    import dataclasses

    tutorial = registry.get(KEY)
    cfg = dataclasses.replace(registry.smoke_config(tutorial), gradient_checkpointing=False)
    model, tokenizer = smoke_models.model(KEY)
    peft_model = models.add_lora(model, tutorial, cfg)
    assert not peft_model.base_model.model.is_gradient_checkpointing
    assert peft_model.peft_config["default"].r == cfg.lora_r
    assert set(peft_model.peft_config["default"].target_modules) == set(tutorial.lora_targets)
    _train_step(peft_model, tokenizer)
    _check_lora_grads(peft_model)


@pytest.mark.parametrize("quant", ["bf16", "4bit"])
def test_embeddings_on_cpu_answer_alike_and_train(smoke_models, quant: str) -> None:
    """The table moves to a CPU lookup outside the parameters; logits and LoRA training are unchanged."""
    import dataclasses

    tutorial = registry.get(KEY)
    cfg = dataclasses.replace(registry.smoke_config(tutorial), embeddings_on_cpu=True)
    model, tokenizer = smoke_models.model(KEY, quant=quant)
    ids = _batch(tokenizer)["input_ids"]
    original = model.get_input_embeddings()
    with torch.no_grad():
        rows = original(ids)
    peft_model = models.add_lora(model, tutorial, cfg)
    lookup = peft_model.get_input_embeddings()
    assert isinstance(lookup, models.CpuEmbedding)
    assert torch.equal(lookup.weight, original.weight.detach().cpu())
    assert torch.equal(lookup(ids), rows)
    assert not any("embed_tokens" in name for name, _ in peft_model.named_parameters())
    lookup.to("meta")  # what model.to(...) does to it: nothing, the table is no parameter or buffer
    assert lookup.weight.device.type == "cpu"
    assert models.embeddings_to_cpu(peft_model) == 0  # already moved
    _train_step(peft_model, tokenizer)  # with checkpointing: the lookup's output still gets grad
    _check_lora_grads(peft_model)


def test_tied_embeddings_stay_where_lm_head_is() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, tie_word_embeddings=True, **registry.TINY)
    model = AutoModelForCausalLM.from_config(config)
    table = model.get_input_embeddings()
    assert models.embeddings_to_cpu(model) == 0
    assert model.get_input_embeddings() is table


def test_a_local_folder_that_is_no_model_is_refused_in_a_sentence(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="no config.json"):
        models.load_model(registry.get(KEY), path=tmp_path)


# --- partial model folders load wrong without a word: refused in one line (issue 26) ---------


PARTIAL_KEY = "qwen1.5"  # tiny Qwen2: its tokenizer class loads from tokenizer_config.json alone


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """A copy of the tiny Qwen1.5 stand-in's folder, to cut pieces out of."""
    import shutil

    source = models.model_path(registry.get(PARTIAL_KEY), smoke_mode=True)
    return Path(shutil.copytree(source, tmp_path / "model"))


def test_a_folder_without_its_tokenizer_is_refused(model_copy: Path) -> None:
    from transformers import AutoTokenizer

    (model_copy / "tokenizer.json").unlink()
    empty = AutoTokenizer.from_pretrained(model_copy)  # what loading it would have given
    assert len(empty) < 10 and empty("hello world", add_special_tokens=False)["input_ids"] == []
    with pytest.raises(models.ModelFolderError) as err:
        models.load_model(registry.get(PARTIAL_KEY), path=model_copy)
    assert "has no tokenizer.json" in str(err.value) and "\n" not in str(err.value)


def test_weights_missing_tensors_are_refused_not_random(model_copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(model_copy / "model.safetensors")
    gone = sorted(k for k in weights if ".1.mlp." in k)
    save_file({k: v for k, v in weights.items() if k not in gone}, model_copy / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(models.ModelFolderError) as err:
        models.load_model(registry.get(PARTIAL_KEY), path=model_copy)
    assert f"lack {len(gone)} tensor(s)" in str(err.value) and gone[0] in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_cpu_embedding_rows_survive_the_next_lookup_while_their_copy_waits() -> None:
    """Rows go to the GPU from pinned memory without the host waiting for the copy: a second
    lookup, made while the first copy still waits behind GPU work, must not overwrite it."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    table = torch.randn(1000, 64).to(torch.bfloat16)
    lookup, on_gpu = models.CpuEmbedding(table), table.cuda()
    ids = [torch.randint(0, 1000, (1, 300), device="cuda") for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work queued before the copies
    rows = [lookup(i) for i in ids]
    for got, i in zip(rows, ids):
        assert torch.equal(got, on_gpu[i])
