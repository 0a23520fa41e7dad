"""`rayrlhf report`: the page is built from files alone (no Ray), so these tests write the files a run
writes (metrics.jsonl, config.yaml, samples/step_<N>.jsonl) and read the page back with html.parser:
which charts, how many points each, which transcripts, and that nothing from the run can inject markup
or make the page fetch anything."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from rayrlhf.config import JobConfig, to_yaml
from rayrlhf.errors import InvalidInput
from rayrlhf.launch.cli import main
from rayrlhf.launch.report import render_report, write_report
from rayrlhf.launch.report_charts import MAX_MARKERS, nice_ticks, tick_labels

VOID = {"meta", "br", "hr", "img", "input", "link", "source", "wbr", "col", "area", "base", "embed", "param", "track"}


# ------------------------------------------------------------------------- reading the page
@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def all(self, tag: str, **attrs: str) -> list[Node]:
        return [n for n in self.iter() if n.tag == tag and all(n.attrs.get(k) == v for k, v in attrs.items())]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class TreeBuilder(HTMLParser):
    """A strict tree: every end tag must close the element open last."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    assert builder.stack == [builder.root], f"unclosed: {[n.tag for n in builder.stack[1:]]}"
    return builder.root


def charts(page: Node) -> dict[str, Node]:
    """The page's SVG charts by title, in page order."""
    return {svg.attrs["aria-label"]: svg for svg in page.all("svg")}


def points(svg: Node) -> Counter[str]:
    """Hover markers per series key."""
    return Counter(c.attrs["data-key"] for c in svg.all("circle"))


def samples_shown(page: Node) -> list[tuple[str, str]]:
    """(pick, the text of its first assistant turn) of every transcript, in page order."""
    out = []
    for div in page.all("div"):
        if "data-pick" in div.attrs:
            turn = next(t for t in div.all("div") if {"turn", "role-assistant"} <= t.classes)
            out.append((div.attrs["data-pick"], turn.all("pre")[0].text()))
    return out


# -------------------------------------------------------------------------- writing a run
def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_config(out: Path, **sections: Any) -> None:
    base = {"output_dir": str(out), "model": {"policy": "tiny:qwen2"}, "data": {"train": "train.jsonl"},
            "schedule": {"steps": 10}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(JobConfig.model_validate(base)))


def online_rows() -> list[dict[str, Any]]:
    """Step 0 evaluation, 10 training steps (reward null at step 4 and NaN at step 7), evaluations merged into
    steps 5 and 10, a worker failure from step 6 and a restart from step 8; `hangs` stays 0."""
    def evaluation(step: int) -> dict[str, Any]:
        greedy = 0.05 * step
        return {"eval/greedy/reward_mean": greedy, "eval/sampled/reward_mean": greedy - 0.02,
                "eval/reward_mean": greedy, "eval/pass@2": 0.1 * step / 10, "timing/eval_s": 1.5}

    rows = [{"step": 0, "weight_version": 0, **evaluation(0), "time": 1000.0}]
    for step in range(1, 11):
        row = {"step": step, "weight_version": step, "reward/std": 0.05, "kl/mean": 0.01 * step,
               "response/length_mean": 20.0 + step, "env/turns_mean": 2.0 + step % 2, "env/tool_calls_mean": float(step % 3),
               "rollout/backend": "vllm", "throughput/tokens_per_s": 1000.0 + step, "timing/step_s": 2.0,
               "timing/rollout_s": 1.0, "timing/train_s": 0.5, "timing/sync_s": 0.1,
               "faults/worker_failures": int(step >= 6), "faults/worker_restarts": int(step >= 8), "faults/hangs": 0,
               "time": 1000.0 + 2 * step}
        row["reward/mean"] = None if step == 4 else math.nan if step == 7 else 0.1 * step
        if step in (5, 10):
            row.update(evaluation(step))
        rows.append(row)
    return rows


def episode(step: int, i: int, score: float | None, answer: str) -> dict[str, Any]:
    """A multi-turn sample: the policy calls a tool, the tool answers (not trained, with a turn reward), the
    policy answers."""
    return {"step": step, "row": 100 + i, "position": i, "sample_index": 0, "request_id": f"s{step}-p{i}",
            "worker": "rollout-0", "weight_version": step - 1, "prompt": 'sort "b & a"',
            "turns": [{"role": "assistant", "text": f"<tool_call>sort {i}</tool_call>", "tokens": 6, "trained": True},
                      {"role": "tool", "text": f"tool result <b>{i}</b>", "tokens": 4, "trained": False, "reward": 0.25},
                      {"role": "assistant", "text": answer, "tokens": 3, "trained": True}],
            "finish_reason": "stop", "score": score, "advantage": 0.0 if score is None else score - 0.4}


SCORES = [0.5, None, 0.9, 0.1, 0.3]  # best 0.9 (#2), median of the scored 0.3 (#4), worst 0.1 (#3); #1 unscored


@pytest.fixture
def online_run(tmp_path: Path) -> Path:
    out = tmp_path / "grpo-run"
    write_config(out, algorithm={"name": "grpo", "group_size": 4}, reward={"function": "reward.py:score"},
                 rollout={"dump_every": 2})
    write_jsonl(out / "metrics.jsonl", [json.dumps(r) for r in online_rows()])  # json.dumps writes NaN as NaN
    for step in (2, 10):
        answers = [f"answer-{step}-{i}" for i in range(len(SCORES))]
        answers[2] += "<script>alert('pwned')</script>"
        write_jsonl(out / "samples" / f"step_{step}.jsonl",
                    [episode(step, i, s, a) for i, (s, a) in enumerate(zip(SCORES, answers))])
    write_jsonl(out / "samples" / "step_6.jsonl", [episode(6, 0, 1.0, "middle dump: not shown")])
    (out / "final").mkdir()
    return out


# --------------------------------------------------------------------------------- online
def test_online_run_draws_one_chart_per_figure_with_every_point(online_run: Path) -> None:
    page = parse(write_report(online_run).read_text())
    found = charts(page)
    assert list(found) == ["Reward: training (solid) and evaluation (dashed)", "KL to the reference, per token",
                           "Response length, tokens", "Turns and tool calls per episode", "Throughput, tokens/s",
                           "Step time split, s", "Faults (running totals, non-zero only)"]
    reward = found["Reward: training (solid) and evaluation (dashed)"]
    # 10 steps less the null and the NaN; the greedy evaluation equals the headline one: drawn once
    assert points(reward) == {"reward/mean": 8, "eval/reward_mean": 3, "eval/pass@2": 3, "eval/sampled/reward_mean": 3}
    assert len(reward.all("polyline", **{"data-key": "reward/mean"})) == 3  # gaps at steps 4 and 7 split the line
    assert len(reward.all("polygon", **{"data-key": "reward/mean"})) == 3  # so does the ±std band
    titles = [c.all("title")[0].text() for c in reward.all("circle", **{"data-key": "reward/mean"})]
    assert titles[2] == "reward/mean ± reward/std at step 3: 0.3"
    labels = [span.text() for span in page.all("span", **{"class": "key"})]
    assert "eval/reward_mean (greedy)" in labels and "eval/greedy/reward_mean" not in labels
    assert points(found["Turns and tool calls per episode"]) == {"env/turns_mean": 10, "env/tool_calls_mean": 10}
    assert points(found["Step time split, s"]) == {"timing/rollout_s": 10, "timing/train_s": 10, "timing/sync_s": 10}
    assert points(found["Faults (running totals, non-zero only)"]) == {"faults/worker_failures": 10,
                                                                       "faults/worker_restarts": 10}
    ticks = [t.text() for t in found["KL to the reference, per token"].all("text", **{"class": "tick"})]
    assert {"0", "10", "0.1"} <= set(ticks)  # x from step 1 to 10 widened to round ticks; y up to kl 0.1


def test_header_names_the_run_and_its_key_config(online_run: Path) -> None:
    page = parse(render_report(online_run))
    cells = {tr.all("td")[0].text(): tr.all("td")[1].text() for tr in page.all("tr")}
    assert cells["run"] == "grpo-run" and cells["algorithm"] == "grpo" and cells["model"] == "tiny:qwen2"
    assert cells["steps done"] == "10 of 10; finished (final/ written)"
    assert cells["wall time"] == "21.5 s (from the metrics rows)"  # 20 s between rows + step 0's evaluation
    assert cells["reward.function"] == "reward.py:score" and cells["algorithm.group_size"] == "4"
    assert cells["rollout.backend"] == "auto" and "model.critic" not in cells  # null values are left out


def test_transcripts_are_the_best_median_and_worst_of_the_last_and_first_dumps(online_run: Path) -> None:
    page = parse(render_report(online_run))
    first_turns = [(pick, text.split("<")[1].removeprefix("tool_call>")) for pick, text in samples_shown(page)]
    assert first_turns == [("best", "sort 2"), ("median", "sort 4"), ("worst", "sort 3")] * 2
    headings = [h.text() for h in page.all("h3")]
    assert headings[0].startswith("Step 10 (last dump): 5 samples, 4 scored")
    assert headings[1].startswith("Step 2 (first dump")
    best = next(d for d in page.all("div") if d.attrs.get("data-pick") == "best")
    turns = [t for t in best.all("div") if "turn" in t.classes]
    assert [(sorted(t.classes - {"turn"})) for t in turns] == [
        ["role-prompt", "untrained"], ["role-assistant", "trained"], ["role-tool", "untrained"], ["role-assistant", "trained"]]
    assert "not trained (environment)" in turns[2].text() and "turn reward 0.25" in turns[2].text()
    assert turns[0].all("pre")[0].text() == 'sort "b & a"'
    assert "score 0.9 · advantage +0.5" in best.text()


def test_model_output_cannot_inject_markup(online_run: Path) -> None:
    rows = [episode(12, 0, 1.0, "</pre></div><script>alert(1)</script><img src=x onerror=alert(2)>")]
    rows[0]["turns"][1]["role"] = 'tool" onmouseover="alert(3)'
    write_jsonl(online_run / "samples" / "step_12.jsonl", rows)
    with (online_run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 11, "faults/<script>x</script>": 2, "reward/mean": 0.5}) + "\n")
    html = render_report(online_run)
    page = parse(html)  # strict: the injected </pre></div> did not close anything
    assert not page.all("script") and not page.all("img")
    assert all(not name.startswith("on") for n in page.iter() for name in n.attrs)
    shown = [text for _, text in samples_shown(page)]
    assert "</pre></div><script>alert(1)</script><img src=x onerror=alert(2)>" in [
        pre.text() for pre in page.all("pre")]  # shown as text, exactly
    assert shown and "&lt;script&gt;" in html
    assert "faults/<script>x</script>" in [s.text() for s in page.all("span", **{"class": "key"})]


def test_page_is_self_contained(online_run: Path) -> None:
    html = write_report(online_run).read_text()
    page = parse(html)
    assert not page.all("script") and not page.all("link") and not page.all("iframe") and not page.all("object")
    assert not [n for n in page.iter() if {"src", "href", "xlink:href"} & set(n.attrs)]
    style = "".join(s.text() for s in page.all("style"))
    assert "url(" not in style and "@import" not in style and "@font-face" not in style
    assert "http://" not in html and "https://" not in html


# -------------------------------------------------------------------------------- offline
def test_offline_reward_model_run(tmp_path: Path) -> None:
    out = tmp_path / "rm"
    write_config(out, algorithm={"name": "rm"}, data={"eval": "pairs_eval.jsonl"}, schedule={"steps": 20})
    rows: list[dict[str, Any]] = [{"step": 0, "eval/loss": 0.69, "eval/accuracy": 0.5, "eval/margin": 0.0,
                                   "timing/eval_s": 0.4, "time": 50.0}]
    for step in range(1, 21):
        row = {"step": step, "data/epoch": 0, "train/loss": 0.7 - 0.02 * step, "train/accuracy": 0.5 + 0.02 * step,
               "train/margin": 0.1 * step, "train/rows": 64, "throughput/tokens_per_s": 5000.0,
               "timing/train_s": 0.2, "timing/step_s": 0.25, "time": 50.0 + step}
        if step in (10, 20):
            row |= {"eval/loss": 0.5, "eval/accuracy": 0.8, "eval/margin": 1.0, "timing/eval_s": 0.4}
        rows.append(row)
    write_jsonl(out / "metrics.jsonl", rows)
    page = parse(render_report(out))
    found = charts(page)
    assert list(found) == ["Throughput, tokens/s", "Step time split, s", "Loss",
                           "Accuracy (chosen scored above rejected)"]
    assert points(found["Loss"]) == {"train/loss": 20, "eval/loss": 3}
    assert points(found["Accuracy (chosen scored above rejected)"]) == {"train/accuracy": 20, "eval/accuracy": 3}
    assert len(found["Loss"].all("polyline", **{"data-key": "eval/loss"})) == 1  # evaluations every 10 steps: one line
    cells = {tr.all("td")[0].text(): tr.all("td")[1].text() for tr in page.all("tr")}
    assert cells["algorithm"] == "rm" and cells["steps done"] == "20 of 20; not finished: running, stopped or failed"
    assert "rollout.backend" not in cells and "algorithm.kl_coef" not in cells  # online-only keys
    assert "No samples" in page.text() and not samples_shown(page)


# ------------------------------------------------------------------------ a run still going
def test_run_still_writing_its_files(online_run: Path) -> None:
    rows = online_rows()
    lines = [json.dumps(r) for r in rows[:4]] + [json.dumps(rows[4])[:37]]  # step 4's row cut mid-write
    (online_run / "metrics.jsonl").write_text("\n".join(lines))
    (online_run / "final").rmdir()
    with (online_run / "samples" / "step_10.jsonl").open("a") as fh:
        fh.write('{"step": 10, "row": 7, "turns": [{"role": "assis')
    page = parse(render_report(online_run))
    reward = charts(page)["Reward: training (solid) and evaluation (dashed)"]
    assert points(reward)["reward/mean"] == 3
    cells = {tr.all("td")[0].text(): tr.all("td")[1].text() for tr in page.all("tr")}
    assert cells["steps done"] == "3 of 10; not finished: running, stopped or failed"
    assert "the last line of metrics.jsonl is still being written (left out)" in page.text()
    assert "(its last line is still being written)" in page.all("h3")[0].text()
    assert [pick for pick, _ in samples_shown(page)] == ["best", "median", "worst"] * 2

    (online_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))  # the run went on
    assert points(charts(parse(render_report(online_run)))["Reward: training (solid) and evaluation (dashed)"]
                  )["reward/mean"] == 5


def test_empty_metrics_and_no_config(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    page = parse(render_report(tmp_path))
    assert not page.all("svg")
    assert "metrics.jsonl holds no rows yet" in page.text() and "no config.yaml in the output folder" in page.text()


def test_a_broken_line_inside_the_file_is_named(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "metrics.jsonl", ['{"step": 1}', "{oops", '{"step": 2}'])
    with pytest.raises(InvalidInput, match=r"metrics\.jsonl:2: not a JSON object"):
        render_report(tmp_path)


# ------------------------------------------------------------------------------------ CLI
def test_cli_writes_the_page_and_names_a_folder_without_metrics(online_run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(online_run)]) == 0
    assert capsys.readouterr().out.strip() == str(online_run / "report.html")
    assert (online_run / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(online_run), "--out", str(tmp_path / "pages" / "r.html")]) == 0
    assert (tmp_path / "pages" / "r.html").is_file()
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "holds no metrics.jsonl" in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the charts
def test_long_runs_thin_the_hover_markers_but_not_the_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": s, "kl/mean": s / 1000} for s in range(1, 1001)])
    svg = charts(parse(render_report(tmp_path)))["KL to the reference, per token"]
    (line,) = svg.all("polyline")
    assert len(line.attrs["points"].split()) == 1000
    markers = svg.all("circle")
    assert len(markers) <= MAX_MARKERS + 1 and markers[-1].all("title")[0].text().endswith("step 1000: 1")


def test_faults_are_drawn_as_steps(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": s, "faults/hangs": int(s >= 3)} for s in range(1, 5)])
    (line,) = charts(parse(render_report(tmp_path)))["Faults (running totals, non-zero only)"].all("polyline")
    xy = [tuple(map(float, p.split(","))) for p in line.attrs["points"].split()]
    assert len(xy) == 7  # 4 points and a horizontal run before each rise
    assert all(a[0] == b[0] or a[1] == b[1] for a, b in zip(xy, xy[1:]))  # only horizontal and vertical moves


@pytest.mark.parametrize(("lo", "hi", "integer", "expected"), [
    (0.0, 1.0, False, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (-0.13, 0.02, False, [-0.15, -0.1, -0.05, 0.0, 0.05]),
    (1, 25, True, [0, 5, 10, 15, 20, 25]),
    (1, 4, True, [1, 2, 3, 4]),
    (3, 3, True, [2, 3, 4]),  # one step: a unit either side
    (0.5, 0.5, False, [0.45, 0.475, 0.5, 0.525, 0.55]),  # one value: ±10%
    (3.9e-14, 4.1e-14, False, [3.9e-14, 3.95e-14, 4.0e-14, 4.05e-14, 4.1e-14]),  # a KL at float round-off
])
def test_nice_ticks(lo: float, hi: float, integer: bool, expected: list[float]) -> None:
    assert nice_ticks(lo, hi, 5 if not integer else 6, integer=integer) == pytest.approx(expected, rel=1e-9, abs=0)


def test_a_curve_at_float_round_off_draws(tmp_path: Path) -> None:
    """A 2-step run whose KL stays near 4e-14 (a fresh policy) once made the y axis zero-height."""
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": s, "reward/mean": 0.1 * s, "kl/mean": 4e-14 + s * 1e-16}
                                             for s in (1, 2)])
    assert "kl/mean" in render_report(tmp_path)


@pytest.mark.parametrize(("ticks", "expected"), [
    ([0.0, 0.25, 0.5], ["0", "0.25", "0.5"]),
    ([10000.0, 12000.0, 14000.0], ["10000", "12000", "14000"]),
    ([1000.0001, 1000.0002, 1000.0003], ["1000.0001", "1000.0002", "1000.0003"]),  # more digits until distinct
    ([0.0, 0.0005, 0.001], ["0", "5e-4", "1e-3"]),  # one style on an axis
    ([0.0, 2e6, 4e6], ["0", "2e6", "4e6"]),
    ([-2.5e-5, 0.0, 2.5e-5], ["-2.5e-5", "0", "2.5e-5"]),
])
def test_tick_labels(ticks: list[float], expected: list[str]) -> None:
    assert tick_labels(ticks) == expected
