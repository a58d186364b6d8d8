"""Notebook 04, exercise 2: the DeepSpeed key that makes ZeRO-3 save whole adapter tensors.

Print the ZeRO section of the course's config and find the key that acts at save time.
"""

from selfllm_utils import distributed, exercises

print(sorted(distributed.deepspeed_config(3)["zero_optimization"]))
SAVE_KEY = "stage3_gather_16bit_weights_on_model_save"

RESULT = exercises.check_zero3_save_key(SAVE_KEY)
