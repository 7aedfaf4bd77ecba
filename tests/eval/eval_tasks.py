"""The custom multiple-choice task the eval tests write: items and lm-eval task YAML."""
from pathlib import Path

# (question, choices, label): docstring-like prompts, the answer in varying positions
ITEMS = [
    ("Return the number of", ["items in the list.", "purple elephants.", "the moon tonight."], 0),
    ("Raise an exception if the", ["banana is ripe.", "file does not exist.", "sky is green."], 1),
    ("This module provides functions for", ["cats and dogs.", "sleeping all day.", "working with paths."], 2),
    ("Close the file and", ["release the lock.", "eat the sandwich.", "paint the wall."], 0),
    ("The default value is", ["a tall giraffe.", "None.", "singing loudly."], 1),
    ("Return a new", ["rainbow of fish.", "orange sunset.", "list of strings."], 2),
    ("If the argument is omitted,", ["the default is used.", "the tree grows.", "the river sleeps."], 0),
    ("Write the data to the", ["kitchen table.", "output stream.", "happy birthday."], 1),
]
TASK = "sdc_mc"


def task_yaml(name: str, data_file: Path, output_type: str = "multiple_choice") -> str:
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data_file}",
             "test_split: test", f"output_type: {output_type}", 'doc_to_text: "{{question}}"']
    if output_type == "multiple_choice":
        lines += ["doc_to_choice: choices", "doc_to_target: label",
                  "metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    else:
        lines += ['doc_to_target: "{{choices[label]}}"', "generation_kwargs:", "  until: ['.']",
                  "metric_list:", "  - metric: exact_match"]
    return "\n".join(lines) + "\n"
