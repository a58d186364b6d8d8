"""checkpoints: a folder saved whole or not at all, DeepSpeed's files loaded without running code.

The checks of what `--resume` picks run on a real ZeRO-3 run's checkpoints in test_distributed.py;
these need no launch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfllm_utils import checkpoints


def save(folder: Path, text: str, fail: BaseException | None = None) -> None:
    """Write one file through `checkpoints.writing`, cut off by `fail` if given."""
    with checkpoints.writing(folder) as partial:
        partial.mkdir()
        (partial / "adapter_model.safetensors").write_text(text)
        if fail:
            raise fail


def test_a_save_cut_off_leaves_the_last_whole_folder_or_none(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    with pytest.raises(OSError):
        save(target, "half", OSError(28, "No space left on device"))
    assert not target.exists()  # no half-written folder that loads as if complete
    save(target, "one")
    save(target, "two")  # a second save replaces the first
    with pytest.raises(KeyboardInterrupt):
        save(target, "three", KeyboardInterrupt())
    assert (target / "adapter_model.safetensors").read_text() == "two"
    save(target, "four")  # the next save clears what the interrupted one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (target / "adapter_model.safetensors").read_text() == "four"


class Payload:
    """Pickles as a call of `exec` that creates `marker`: what a malicious checkpoint file holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_deepspeed_file_that_runs_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "code-ran"
    path = tmp_path / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.parent.mkdir()
    torch.save({"optimizer_state_dict": {"step": torch.tensor(4)}, "extra": Payload(marker)}, path)
    engine = TorchCheckpointEngine()  # the engine DeepSpeed's load_checkpoint reads through
    with checkpoints.loading_without_code() as loaded:
        with pytest.raises(checkpoints.CheckpointError) as err:
            engine.load(str(path), map_location="cpu")
    assert not marker.exists() and loaded == []
    assert "\n" not in str(err.value) and "asks to run exec " in str(err.value)
    assert str(path) in str(err.value) and "--trust-checkpoint" in str(err.value)
    with checkpoints.loading_without_code(allow_pickle=True):  # the learner trusts it: DeepSpeed's way
        engine.load(str(path), map_location="cpu")
    assert marker.exists()  # the payload is real: DeepSpeed's own loading runs it


def test_deepspeeds_own_classes_load_without_code(tmp_path: Path) -> None:
    """What DeepSpeed pickles besides tensors (the loss scaler, the ZeRO stage) is allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "optim_states.pt"
    fp16 = DynamicLossScaler(2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                             consecutive_hysteresis=False)
    torch.save({"loss_scaler": LossScaler(1.0), "fp16_scaler": fp16,
                "zero_stage": ZeroStageEnum.weights, "step": torch.ones(2),
                "param_slice_mappings": [{"w": fragment_address(numel=4, start=8)}]}, path)
    state = checkpoints.load_without_code(path)
    assert state["zero_stage"] is ZeroStageEnum.weights and state["loss_scaler"].cur_scale == 1.0
    assert state["fp16_scaler"].cur_scale == 2.0**16
    assert state["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=8)
