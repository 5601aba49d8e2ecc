"""tools/benchkit/steps.py: a step log read by round, its breakdown and generation floor, the closed-loop model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from benchkit.steps import Step, breakdown, floor_of, parse, read, waiting_share  # noqa: E402


def line(start: float, seconds: float, tokens: int, seqs: int, prompt: int, prompt_seqs: int) -> str:
    return f"{start:.6f} {seconds:.6f} {tokens} {seqs} {prompt} {prompt_seqs}\n"


def test_parse_leaves_out_a_torn_last_line() -> None:
    text = line(1.0, 0.5, 4, 4, 0, 0) + line(2.0, 0.25, 30, 4, 27, 1) + "3.0 0.1 4"
    assert parse(text) == [Step(1.0, 0.5, 4, 4, 0, 0), Step(2.0, 0.25, 30, 4, 27, 1)]


def test_read_keeps_the_steps_of_every_worker_that_started_inside_the_window(tmp_path: Path) -> None:
    prefix = tmp_path / "steps-node"
    (tmp_path / "steps-node.100").write_text(line(5.0, 0.1, 4, 4, 0, 0) + line(10.0, 0.1, 4, 4, 0, 0))
    (tmp_path / "steps-node.200").write_text(line(7.0, 0.1, 2, 2, 0, 0))  # a restarted worker
    (tmp_path / "steps-other.300").write_text(line(8.0, 0.1, 1, 1, 0, 0))  # another node's
    assert [s.start for s in read([prefix], 4.0, 9.0)] == [5.0, 7.0]


def test_the_generation_floor_is_the_fed_tokens_at_the_cost_of_a_token_in_a_full_step() -> None:
    steps = [
        Step(0.0, 1.0, 800, 1, 800, 1),   # a prompt alone
        Step(1.0, 0.2, 4, 4, 0, 0),       # full: 4 generated tokens in 0.2 s
        Step(1.2, 0.3, 4, 4, 0, 0),       # full: 0.3 s
        Step(1.5, 0.1, 2, 2, 0, 0),       # two sequences only (not a full step)
        Step(1.6, 0.4, 30, 4, 27, 1),     # 3 generated tokens beside 27 prompt tokens
    ]
    b = breakdown(steps, parallel=4, wall_s=4.0)
    assert b["full_steps"] == 2 and b["full_step_token_s"] == pytest.approx(0.5 / 8)
    assert b["generated_fed"] == 4 + 4 + 2 + 3
    assert b["generation_floor_s"] == pytest.approx(13 * 0.5 / 8)
    assert b["decode_s"] == pytest.approx(2.0) and b["decode_share"] == pytest.approx(0.5)
    assert (b["generation_only_steps"], b["generation_only_s"]) == (3, pytest.approx(0.6))
    assert (b["prompt_steps"], b["prompt_steps_s"], b["prompt_only_s"]) == (2, pytest.approx(1.4), pytest.approx(1.0))
    assert b["prompt_tokens_evaluated"] == 827
    # The decode time is the floor, what the prompt tokens added, and the partly filled steps' loss.
    assert b["prompt_marginal_s"] == pytest.approx(1.4 - 3 * 0.5 / 8)
    assert b["partial_steps_s"] == pytest.approx(0.6 - 10 * 0.5 / 8)
    assert b["generation_floor_s"] + b["prompt_marginal_s"] + b["partial_steps_s"] == pytest.approx(b["decode_s"])
    # Nodes side by side: the round cannot end before the slowest node's own floor.
    assert floor_of([b, {**b, "generation_floor_s": 9.0}]) == 9.0


def test_without_a_full_step_there_is_no_floor() -> None:
    assert math.isnan(breakdown([Step(0.0, 0.1, 2, 2, 0, 0)], parallel=4, wall_s=1.0)["generation_floor_s"])


def test_the_waiting_share_of_the_closed_loop_model() -> None:
    # 8 conversations on 4 slots, 6 turns: half of each cycle (wall / 6) is spent waiting.
    assert waiting_share(8, 4, 6) == pytest.approx(4 / 48)
    assert math.isnan(waiting_share(4, 4, 6))  # a slot each: nobody waits, the model says nothing
