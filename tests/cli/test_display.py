"""The live progress display and the results table at 80 and 120 columns, on a fixed-size Console."""

from __future__ import annotations

import re
from typing import Any

import pytest
from rich.console import Console

from distillery_cli.display import JobProgress, jobs_table, kd_comparison, results_table
from tests.sse_helpers import results_for


def render(renderable: Any, width: int) -> list[str]:
    console = Console(record=True, width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    lines = console.export_text().splitlines()
    assert lines, "nothing rendered"
    too_wide = [line for line in lines if len(line) > width]
    assert not too_wide, f"lines wider than {width}: {too_wide}"
    return lines


def flat(lines: list[str]) -> str:
    """The rendered text with wrapped lines joined (wrapping is the console's business, not the words')."""
    return re.sub(r"\s+", " ", " ".join(lines))


def a_running_job(**overrides: Any) -> JobProgress:
    view = JobProgress()
    view.update_from_job(
        {
            "status": "running",
            "progress": 47.3,
            "phase": "distill",
            "eta_seconds": 95.0,
            "metrics": {
                "stage": 2,
                "epoch": 13,
                "total_loss": 0.41234,
                "distillation_loss": 0.2513,
                "student_loss": 0.1611,
                "student_accuracy": 0.9312,
                "learning_rate": 0.00123,
            },
        }
        | overrides
    )
    return view


@pytest.mark.parametrize("width", [80, 120])
def test_the_progress_line_shows_bar_percent_phase_and_eta_first(width: int) -> None:
    first, second = render(a_running_job(), width)
    bar = re.match(r"(█+)(░+) ", first)
    assert bar is not None, first
    assert len(bar.group(1) + bar.group(2)) >= 20  # a bar, not 0-2 cells
    assert round(len(bar.group(1)) / len(bar.group(1) + bar.group(2)), 1) == 0.5  # 47% of it filled
    assert " 47% distill s2 e13 ETA 1:35 " in first
    assert "loss 0.4123" in second and "val 0.9312" in second  # metrics on their own line


def test_a_long_phase_is_cut_before_the_bar_percent_or_eta() -> None:
    view = a_running_job(phase="teacher_finetune_with_a_very_long_phase_name_" * 3)
    first, _ = render(view, 80)
    assert re.match(r"█+░+  47% teacher_finetune.*… ETA 1:35 \d+:\d\d$", first), first
    narrow, _ = render(view, 50)
    assert "47%" in narrow and "ETA 1:35" in narrow


def test_the_display_follows_progress_events_between_snapshots() -> None:
    view = a_running_job()
    event = {"progress": 80.0, "phase": "distill", "eta_seconds": 12.0, "epoch": 20}
    view.update_from_event("progress", event)
    first, _ = render(view, 80)
    assert " 80% distill s2 e20 ETA 0:12 " in first


def test_a_finished_job_reads_100_percent_and_its_status() -> None:
    view = a_running_job(status="completed", phase="done", progress=99.0)
    first, _ = render(view, 80)
    assert " 100% completed ETA 0:00 " in first


# -- results -----------------------------------------------------------------------------------------------


def contract_results(**overrides: Any) -> dict[str, Any]:
    """A results document with the fields of the results contract (student_accuracy, selected_by, ...)."""
    return results_for(3) | {
        "student_accuracy": 0.9861,
        "final_student_accuracy": 0.9778,
        "best_student_accuracy": 0.9861,
        "selected_by": "best_validation",
        "selected_epoch": 7,
        "metric_direction": "higher_is_better",
        "metric_split": "test",
        "baseline_accuracy": 0.9583,
        "kd_gain": 2.78,
        "kd_gain_unit": "points",
        **overrides,
    }


@pytest.mark.parametrize("width", [80, 120])
def test_results_headline_the_delivered_student_with_how_it_was_chosen(width: int) -> None:
    text = flat(render(results_table(contract_results()), width))
    assert re.search(r"Test accuracy\s+│\s+98\.06%\s+│\s+98\.61%", text), text
    assert "97.78" not in text  # the last epoch's figure is not what is delivered
    assert "best validation epoch (7)" in text
    assert "+2.78 points of test accuracy, KD better (accuracy: higher is better)" in text
    assert re.search(r"Size\s+│\s+0\.458 MiB", text) and "0.050 ms" in text
    assert "_" not in text  # words, not snake_case keys


def test_results_say_when_kd_loses_on_accuracy() -> None:
    text = flat(render(results_table(contract_results(kd_gain=-1.39, baseline_accuracy=1.0)), 80))
    assert "-1.39 points of test accuracy, KD worse" in text


def test_a_perplexity_job_where_kd_loses_says_so_with_the_direction() -> None:
    # The case from the issue: KD student 3.297 against labels-only 3.207, reported as "+8.98 points".
    old = results_for(3) | {
        "task": "causal-lm",
        "metric": "perplexity",
        "teacher_accuracy": 3.1,
        "best_student_accuracy": 3.297,
        "final_student_accuracy": 3.31,
        "baseline_accuracy": 3.207,
        "kd_gain": 8.98,
    }
    assert kd_comparison(old) == "-0.090 perplexity, KD worse (perplexity: lower is better)"
    text = flat(render(results_table(old), 80))
    assert "points" not in text
    assert re.search(r"Test perplexity\s+│\s+3\.100\s+│\s+3\.297", text)
    new = old | {
        "student_accuracy": 3.297,
        "metric_direction": "lower_is_better",
        "kd_gain": -0.09,
        "kd_gain_unit": "perplexity",
        "selected_by": "last",
    }
    text = flat(render(results_table(new), 80))
    assert "-0.090 perplexity, KD worse (perplexity: lower is better)" in text
    assert "weights of the last epoch" in text


def test_older_results_fall_back_to_the_best_validation_figure() -> None:
    text = flat(render(results_table(results_for(3)), 80))  # no student_accuracy / selected_by
    assert re.search(r"Test accuracy\s+│\s+98\.06%\s+│\s+95\.83%", text)
    assert "+2.22 points of test accuracy, KD better" in text


@pytest.mark.parametrize("width", [80, 120])
def test_the_jobs_table_prints_ids_whole(width: int) -> None:
    jobs = [
        {
            "job_id": f"{n:08x}-39bd-4fdc-9c50-635382e05d3f",
            "status": status,
            "progress": progress,
            "created_at": "2026-11-29T03:08:03.123456Z",
            "teacher_model_name": "hf-internal-testing/tiny-random-bert-for-sequence-classification",
        }
        for n, (status, progress) in enumerate([("cancelling", 47.2), ("completed", 100.0), ("queued", 0.0)])
    ]
    lines = render(jobs_table(jobs, width), width)
    for job in jobs:
        assert any(line.startswith(job["job_id"] + "  ") for line in lines), lines
    assert re.search(r"cancelling\s+47%\s+2026-11-29 03:08\s+hf-", "\n".join(lines))


def test_elapsed_time_is_the_jobs_own() -> None:
    view = a_running_job(
        status="completed", started_at="2026-11-29T03:08:03Z", finished_at="2026-11-29T03:09:08.5Z"
    )
    first, _ = render(view, 80)
    assert first.endswith(" ETA 0:00 1:06"), first


def test_the_metrics_line_is_the_current_phases_without_duplicates() -> None:
    view = a_running_job()
    view.update_from_event("progress", {"phase": "distill", "loss": 0.39, "accuracy": 0.94})
    _, second = render(view, 80)
    assert second.count("loss ") == 1 and second.count("val ") == 1
    # A new phase (the teacher's figures in its event data) clears the student's numbers.
    view.update_from_event("phase", {"phase": "evaluate", "accuracy": 0.9833})
    lines = render(view, 80)
    assert len(lines) == 1 and "0.9833" not in lines[0]


def test_the_baseline_stage_summary_keeps_its_stage_number() -> None:
    from rich.live import Live

    from distillery_cli.display import JobView

    console = Console(record=True, width=80, force_terminal=False)
    with Live(console=console, auto_refresh=False) as live:
        view = JobView(live)
        for epoch in (1, 2):
            metric = {"phase": "baseline", "stage": 0, "epoch": epoch, "total_loss": 0.5}
            view.log_event("metric", {"data": metric})
        view.log_event("phase", {"message": "distill stage 1: ratio 0.005", "data": {"phase": "distill"}})
    text = console.export_text()
    assert "baseline stage 0: 2 epochs" in text, text
