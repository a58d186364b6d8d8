"""The `selfllm` command: doctor, download, argument errors."""

import json

import pytest
import torch

from selfllm_utils import cache, cli, models, registry


def test_doctor_json_is_one_parsable_line(capsys):
    info = cli.doctor(as_json=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    parsed = json.loads(lines[0])
    assert parsed["smoke_mode"] is True  # conftest forces smoke mode
    assert (parsed["gpu"] is None) == (not torch.cuda.is_available())
    assert set(parsed["tutorials"]) == set(registry.TUTORIALS)
    assert parsed["versions"]["transformers"] == info["versions"]["transformers"]
    assert parsed["host_ram_gib"] is None or parsed["host_ram_gib"] > 0


def test_doctor_checks_the_host_ram_offloading_needs():
    """On a 6 GB card the QLoRA step offloads its checkpointed activations when the host has
    the RAM, and falls back to the smaller step, saying why, when it has not."""
    roomy, short = cli.fit_report(6.0, host_gib=64.0)["deepseek"], cli.fit_report(6.0, host_gib=1.0)["deepseek"]
    assert "offloaded to host RAM" in roomy and "GiB pinned host RAM" in roomy
    assert "offloaded to host RAM" not in short and "GiB of host RAM, 1.0 GiB available" in short


def test_doctor_says_what_fits_a_24_gb_card():
    from selfllm_utils import memory

    report = cli.fit_report(24.0)
    assert report["deepseek"].startswith("fits (4bit)")  # QLoRA
    assert report["qwen2"].startswith("fits (bf16)")  # measured 21.5 GiB reserved on an H200
    budget = memory.token_budget("qwen2", registry.get("qwen2").config, gpu_gib=24.0)
    assert str(budget) in report["qwen2"] and f"{budget.tokens:,} tokens" in report["qwen2"]
    # notebook 04's script: 14B bf16 weights (26 GiB) do not fit one 24 GB card, ZeRO-3 with offload does
    assert report["qwen1.5"].startswith("fits (bf16, zero3-offload on 1 GPU(s))")
    assert cli.fit_report(24.0, gpus=4)["qwen1.5"].startswith("fits (bf16, zero3 on 4 GPU(s))")
    assert cli.fit_report(141.0, gpus=2)["qwen1.5"].startswith("fits (bf16, ddp on 2 GPU(s))")
    assert cli.fit_report(6.0)["qwen1.5"].startswith("does not fit")
    assert cli.fit_report(8.0)["qwen2"].startswith("does not fit")
    assert all(v.startswith("no GPU") for v in cli.fit_report(None).values())


def test_download_offline_is_one_line(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded with url: /api/v1/models\n(more lines)")

    monkeypatch.setenv("SELFLLM_HOME", str(tmp_path))
    monkeypatch.setattr(cache, "fetch", offline)
    with pytest.raises(SystemExit) as err:
        cli.main(["download", "qwen2"])
    message = str(err.value)
    assert "\n" not in message
    assert "qwen/Qwen2-7B-Instruct" in message and "SELFLLM_SMOKE" in message


def test_download_needs_a_tutorial():
    with pytest.raises(SystemExit):
        cli.main(["download"])


def test_unknown_tutorial_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["download", "llama9"])
    assert "invalid choice" in capsys.readouterr().err


def test_cached_models_ignores_partial_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFLLM_HOME", str(tmp_path))
    folder = tmp_path / "models" / registry.get("qwen2").modelscope_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    assert cli.cached_models() == []  # no weights: a cut-off download
    (folder / "model.safetensors").write_bytes(b"x")
    assert cli.cached_models() == []  # no tokenizer file: it would load nearly empty
    (folder / "tokenizer.json").write_text("{}")
    assert cli.cached_models() == ["qwen2"]


def _demo(argv):
    """`selfllm webdemo ...` ends with the server's exit code (0: stopped cleanly)."""
    with pytest.raises(SystemExit) as end:
        cli.main(argv)
    assert end.value.code == 0


def test_webdemo_binds_127_0_0_1_by_default(streamlit_address, capsys):
    assert streamlit_address(lambda: _demo(["webdemo"])) == "127.0.0.1"
    assert "127.0.0.1" in capsys.readouterr().out
    assert streamlit_address(lambda: _demo(["webdemo", "--public"])) == "0.0.0.0"  # only when asked
