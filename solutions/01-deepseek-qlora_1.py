"""Notebook 01, exercise 1: a record the validator rejects, and the field its message names.

An empty answer is the classic: the model would learn to say nothing. Other rejected records:
a missing "instruction", a number where a string belongs, a "history" that is not a list of
[user, assistant] pairs.
"""

from selfllm_utils import exercises

my_record = {"instruction": "你是谁？", "input": "", "output": ""}
MY_FIELD = "output"  # the message: "my_records.json, record 1: field 'output' is empty: ..."

RESULT = exercises.check_rejected_record(my_record, MY_FIELD)
