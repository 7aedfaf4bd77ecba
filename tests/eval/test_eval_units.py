"""Scores picked from the harness's results (groups, tags, filters) and config checks, without a model."""
import pytest

from sparse_dc.config.base import ConfigError
from sparse_dc.eval.config import PAPER_TASKS, EvalConfig
from sparse_dc.eval.run import downstream_scores, sample_counts

# the shape of lm_eval.simple_evaluate's results for --tasks mmlu,ai2_arc,gsm8k (a group with a subgroup, a tag
# of two tasks, a generative task with two filters)
RESULTS = {
    "results": {
        "mmlu": {"alias": "mmlu", "acc,none": 0.26, "acc_stderr,none": 0.004},
        "mmlu_humanities": {"alias": " - humanities", "acc,none": 0.25, "acc_stderr,none": 0.006},
        "mmlu_philosophy": {"alias": "  - philosophy", "acc,none": 0.24, "acc_stderr,none": 0.02},
        "mmlu_law": {"alias": "  - law", "acc,none": 0.26, "acc_stderr,none": 0.01},
        "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.3, "acc_stderr,none": 0.04},
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.43, "acc_stderr,none": 0.01, "acc_norm,none": 0.4,
                     "acc_norm_stderr,none": 0.01},
        "arc_challenge": {"alias": "arc_challenge", "acc,none": 0.2, "acc_stderr,none": "N/A"},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.01, "exact_match_stderr,strict-match": 0.003,
                  "exact_match,flexible-extract": 0.02, "exact_match_stderr,flexible-extract": 0.004},
    },
    "groups": {"mmlu": {"alias": "mmlu", "acc,none": 0.26, "acc_stderr,none": 0.004},
               "mmlu_humanities": {"alias": " - humanities", "acc,none": 0.25, "acc_stderr,none": 0.006}},
    "group_subtasks": {"mmlu": ["mmlu_humanities", "mmlu_anatomy"],
                       "mmlu_humanities": ["mmlu_philosophy", "mmlu_law"],
                       "arc_easy": [], "arc_challenge": [], "gsm8k": []},
    "n-samples": {"mmlu_philosophy": {"original": 311, "effective": 311}, "mmlu_law": {"effective": 1534},
                  "mmlu_anatomy": {"effective": 135}, "arc_easy": {"effective": 2376},
                  "arc_challenge": {"effective": 1172}, "gsm8k": {"effective": 1319}},
}


def test_a_group_keeps_its_aggregate_a_tag_its_tasks_and_filters_their_name():
    scores = downstream_scores(RESULTS, ["mmlu", "ai2_arc", "gsm8k"])
    assert list(scores) == ["mmlu", "gsm8k", "arc_easy", "arc_challenge"]  # no mmlu subtasks or subgroups
    assert scores["mmlu"] == {"acc": {"value": 0.26, "stderr": 0.004}}
    assert scores["arc_easy"]["acc_norm"] == {"value": 0.4, "stderr": 0.01}
    assert scores["arc_challenge"]["acc"] == {"value": 0.2, "stderr": None}  # the harness's "N/A"
    assert scores["gsm8k"] == {"exact_match,strict-match": {"value": 0.01, "stderr": 0.003},
                               "exact_match,flexible-extract": {"value": 0.02, "stderr": 0.004}}
    assert sample_counts(RESULTS, list(scores)) == {"mmlu": 311 + 1534 + 135, "gsm8k": 1319, "arc_easy": 2376,
                                                    "arc_challenge": 1172}


def test_config_defaults_to_the_papers_suite_and_checks_values():
    cfg = EvalConfig(checkpoint="runs/x")
    cfg.validate()
    assert cfg.tasks == list(PAPER_TASKS) and cfg.num_fewshot == 0
    for field, value, expected in (("limit", 0, "limit=0: expected null or an integer >= 1"),
                                   ("batch_size", 0, "batch_size=0: expected an integer >= 1"),
                                   ("tasks", [], "tasks=[]: expected one or more lm-eval task names")):
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            EvalConfig(checkpoint="runs/x", **{field: value}).validate()
