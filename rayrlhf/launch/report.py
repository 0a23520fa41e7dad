"""`rayrlhf report OUTPUT_DIR`: a run's curves and a few transcripts in one self-contained HTML page.

It reads only files (metrics.jsonl, config.yaml, samples/step_<N>.jsonl), so it works without Ray, on a
copy of an output_dir and on a run that is still going (an incomplete last line is left out). The page
has no scripts, stylesheets or fonts to fetch and names no URL: the charts are inline SVG drawn by
`report_charts`, and every text from the run (prompts, model outputs, tool results, metric keys) is
HTML-escaped, since model outputs are untrusted.
"""

from __future__ import annotations

import json
import logging
import re
import time
from html import escape
from pathlib import Path
from typing import Any

import yaml

from rayrlhf.errors import InvalidInput
from rayrlhf.launch.report_charts import Chart, Point, Series, exact, finite, fmt, legend, svg_chart

log = logging.getLogger(__name__)

SAMPLES_FILE = re.compile(r"step_(\d+)\.jsonl")
EVAL_REWARD = re.compile(r"eval/(?:([^/]+)/)?(reward_mean|true_reward_mean|pass@\d+|mean@[^/]+)")
MAX_TEXT = 20_000  # characters of one turn shown; a longer one is cut with a note
ROLES = ("system", "user", "assistant", "tool", "prompt")

# The plain charts after the reward chart, in page order: (title, keys); eval/* keys are drawn dashed.
CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("KL to the reference, per token", ("kl/mean",)),
    ("Response length, tokens", ("response/length_mean",)),
    ("Turns and tool calls per episode", ("env/turns_mean", "env/tool_calls_mean")),
    ("Throughput, tokens/s", ("throughput/tokens_per_s",)),
    ("Step time split, s", ("timing/rollout_s", "timing/train_s", "timing/sync_s")),
)
OFFLINE_CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Loss", ("loss", "train/loss", "eval/loss")),
    ("Accuracy (chosen scored above rejected)", ("train/accuracy", "eval/accuracy")),
)

# Config values in the header: (dotted key, online jobs only).
KEY_CONFIG: tuple[tuple[str, bool], ...] = (
    ("model.policy", False), ("model.reference", False), ("model.critic", True), ("model.reward", True),
    ("model.lora", False), ("reward.function", True), ("reward.functions", True), ("reward.url", True),
    ("reward.eval_function", True), ("env.class", True), ("env.max_turns", True), ("data.train", False),
    ("data.eval", False), ("algorithm.group_size", True), ("algorithm.kl_coef", True),
    ("algorithm.kl_estimator", True), ("algorithm.beta", False), ("rollout.backend", True),
    ("rollout.num_workers", True), ("rollout.max_new_tokens", True), ("rollout.temperature", True),
    ("trainer.policy.num_ranks", False), ("trainer.policy.lr", False), ("trainer.critic.num_ranks", True),
    ("trainer.critic.lr", True), ("trainer.zero_stage", False), ("trainer.mini_batch_size", False),
    ("schedule.steps", False), ("schedule.prompts_per_step", True), ("schedule.max_staleness", True),
    ("schedule.eval_every", False), ("seed", False),
)
OFFLINE_ALGORITHMS = ("sft", "rm", "dpo")


# ------------------------------------------------------------------------------------ reading
def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The objects of a JSON-lines file that a running job may be appending to, and whether its last line
    was incomplete (left out: the job is writing it). A bad line elsewhere is bad input naming the line."""
    lines = path.read_text(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:
                return rows, True
            raise InvalidInput(f"{path}:{i + 1}: not a JSON object ({exc.msg}); the report cannot read this file") from None
        if not isinstance(obj, dict):
            raise InvalidInput(f"{path}:{i + 1}: expected a JSON object per line, got {type(obj).__name__}")
        rows.append(obj)
    return rows, False


def read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    """config.yaml as a plain mapping (not validated: the run may come from another version), or a note why not."""
    if not path.is_file():
        return {}, f"no {path.name} in the output folder"
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        return {}, f"{path} could not be read: {str(exc).splitlines()[0]}"
    return (cfg, None) if isinstance(cfg, dict) else ({}, f"{path} does not hold a mapping")


def dotted(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def step_of(row: dict[str, Any]) -> int | None:
    step = row.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def series_points(rows: list[dict[str, Any]], key: str) -> list[Point]:
    """(step, value) of every row holding `key`, in step order; null/NaN values are None (gaps). Rows without
    the key are skipped, so evaluation points every N steps draw one line; a step written twice keeps the last."""
    by_step: dict[int, float | None] = {}
    for row in rows:
        if key in row:
            by_step[row["step"]] = finite(row[key])
    return sorted(by_step.items())


# ------------------------------------------------------------------------------------- charts
def reward_chart(rows: list[dict[str, Any]], keys: list[str]) -> Chart:
    """Training reward (± std band) with every evaluation reward, pass@k and mean@n on one chart. An
    evaluation mode's series equal to the headline one (eval/greedy/reward_mean = eval/reward_mean with one
    decoding mode) is not drawn twice: the headline's label names the mode."""
    series: list[Series] = []
    if "reward/mean" in keys:
        pts = series_points(rows, "reward/mean")
        std = dict(series_points(rows, "reward/std"))
        band: list[tuple[int, float | None, float | None]] = []
        for s, m in pts:
            sd = std.get(s)
            band.append((s, m - sd, m + sd) if m is not None and sd is not None else (s, None, None))
        has_band = any(lo is not None for _, lo, _ in band)
        series.append(Series("reward/mean", "reward/mean" + (" ± reward/std" if has_band else ""), pts,
                             band if has_band else []))
    evals = [k for k in keys if EVAL_REWARD.fullmatch(k)]
    headline = [k for k in evals if EVAL_REWARD.fullmatch(k).group(1) is None]  # type: ignore[union-attr]
    points = {k: series_points(rows, k) for k in evals}
    labels = {k: k for k in evals}
    for k in evals:
        mode, figure = EVAL_REWARD.fullmatch(k).groups()  # type: ignore[union-attr]
        if mode is not None and points[k] == points.get(f"eval/{figure}"):
            labels[f"eval/{figure}"] += f" ({mode})"
            labels.pop(k)
    ordered = headline + [k for k in evals if k not in headline]
    series += [Series(k, labels[k], points[k], dashed=True) for k in ordered if k in labels]
    return Chart("Reward: training (solid) and evaluation (dashed)", series)


def build_charts(rows: list[dict[str, Any]]) -> list[Chart]:
    """Every chart whose keys hold at least one finite value, in page order."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    faults = [k for k in keys if k.startswith("faults/") and any(v for _, v in series_points(rows, k))]

    def plain(specs: tuple[tuple[str, tuple[str, ...]], ...]) -> list[Chart]:
        return [Chart(title, [Series(k, k, series_points(rows, k), dashed=k.startswith("eval/"))
                              for k in chart_keys if k in keys]) for title, chart_keys in specs]

    specs = [reward_chart(rows, keys), *plain(CHARTS),
             Chart("Faults (running totals, non-zero only)", [Series(k, k, series_points(rows, k), steps=True)
                                                              for k in faults]),
             *plain(OFFLINE_CHARTS)]
    charts = []
    for chart in specs:
        chart.series = [s for s in chart.series if s.finite]
        if chart.series:
            charts.append(chart)
    return charts


# -------------------------------------------------------------------------------- transcripts
def samples_files(out: Path) -> list[tuple[int, Path]]:
    """samples/step_<N>.jsonl in step order."""
    found = [(int(m.group(1)), p) for p in (out / "samples").glob("step_*.jsonl") if (m := SAMPLES_FILE.fullmatch(p.name))]
    return sorted(found)


def pick_transcripts(samples: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The best-, median- and worst-scored samples (ties: the first in the file), each once; samples without
    a score are not ranked (with none scored, the first sample is shown)."""
    ranked = sorted((score, i) for i, x in enumerate(samples) if (score := finite(x.get("score"))) is not None)
    if not ranked:
        return [("unscored", samples[0])] if samples else []
    best = min(ranked, key=lambda t: (-t[0], t[1]))
    picks = [("best", best[1]), ("median", ranked[(len(ranked) - 1) // 2][1]), ("worst", ranked[0][1])]
    seen: set[int] = set()
    out = []
    for label, i in picks:
        if i not in seen:
            seen.add(i)
            out.append((label, samples[i]))
    return out


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + f"\n… ({len(text) - MAX_TEXT} more characters not shown)"
    return escape(text)


def _turn(role: Any, text: Any, trained: bool, tokens: Any = None, reward: Any = None) -> str:
    role = str(role)
    css = role if role in ROLES else "other"
    facts = [f"{tokens} tokens"] if isinstance(tokens, int) else []
    if finite(reward) is not None:
        facts.append(f"turn reward {exact(finite(reward))}")  # type: ignore[arg-type]
    badge = ('<span class="badge trained">trained</span>' if trained else
             '<span class="badge">not trained' + ("" if role == "prompt" else " (environment)") + "</span>")
    return (f'<div class="turn role-{css} {"trained" if trained else "untrained"}"><div class="role">{escape(role)}'
            f'{badge} <span class="facts">{escape(" · ".join(facts))}</span></div><pre>{_text(text)}</pre></div>')


def render_transcript(label: str, sample: dict[str, Any]) -> str:
    """One sample: what it is (score, advantage, where it came from), its prompt and every turn, trained
    (policy) turns marked apart from environment turns."""
    score, adv = finite(sample.get("score")), finite(sample.get("advantage"))
    facts = [f"score {score:.6g}" if score is not None else "not scored",
             f"advantage {adv:+.4g}" if adv is not None else "advantage n/a"]
    for key, name in (("finish_reason", "finish"), ("row", "data row"), ("sample_index", "sample"),
                      ("worker", "worker"), ("weight_version", "weights v")):
        if sample.get(key) is not None:
            facts.append(f"{name} {sample[key]}" if name != "weights v" else f"weights v{sample[key]}")
    parts = [f'<div class="sample" data-pick="{escape(label)}"><div class="meta"><b>{escape(label)}</b> · '
             f"{escape(' · '.join(str(f) for f in facts))}</div>"]
    prompt = sample.get("prompt")
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):  # a conversation's opening messages
        parts += [_turn(m.get("role", "prompt"), m.get("content", ""), False) for m in prompt]
    else:
        parts.append(_turn("prompt", "" if prompt is None else prompt, False))
    for turn in sample.get("turns") or []:
        if isinstance(turn, dict):
            parts.append(_turn(turn.get("role", "assistant"), turn.get("text") or "", bool(turn.get("trained")),
                               turn.get("tokens"), turn.get("reward")))
    parts.append("</div>")
    return "".join(parts)


def transcripts_section(out: Path) -> str:
    files = samples_files(out)
    if not files:
        return ('<p class="none">No samples: set <code>rollout.dump_every: N</code> to write '
                "<code>samples/step_&lt;N&gt;.jsonl</code> (online jobs only).</p>")
    chosen = [(files[-1], "last dump")] + ([(files[0], "first dump, for contrast")] if len(files) > 1 else [])
    html = ['<p class="roles">Roles: <span class="turn-key role-assistant">assistant (policy, trained)</span> '
            '<span class="turn-key role-user">user</span> <span class="turn-key role-tool">tool</span> '
            '<span class="turn-key role-prompt">prompt / system</span>; dashed: environment text, never trained.</p>']
    for (step, path), which in chosen:
        samples, partial = read_jsonl(path)
        scores = [s for s in (finite(x.get("score")) for x in samples) if s is not None]
        summary = f"{len(samples)} samples, {len(scores)} scored" + (
            f", mean score {fmt(sum(scores) / len(scores))}" if scores else "")
        note = ' <span class="note">(its last line is still being written)</span>' if partial else ""
        html.append(f"<h3>Step {step} ({which}): {escape(summary)}{note}</h3>")
        html += [render_transcript(label, sample) for label, sample in pick_transcripts(samples)]
    return "".join(html)


# ----------------------------------------------------------------------------------- the page
def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s"


def header_rows(out: Path, rows: list[dict[str, Any]], cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """What run this is and how far it got."""
    algo = dotted(cfg, "algorithm.name")
    total = dotted(cfg, "schedule.steps")
    steps = max((r["step"] for r in rows), default=None)
    done = "finished (final/ written)" if (out / "final").exists() else "not finished: running, stopped or failed"
    info = [("run", str(dotted(cfg, "logging.run_name") or out.resolve().name)), ("algorithm", str(algo or "unknown")),
            ("model", str(dotted(cfg, "model.policy") or "unknown")),
            ("steps done", f"{steps if steps is not None else 0}" + (f" of {total}" if total else "") + f"; {done}")]
    times = [t for t in (finite(r.get("time")) for r in rows) if t is not None]
    if times:  # first row's time is its end: add that step's (or step 0 evaluation's) own duration
        first = next((r for r in rows if finite(r.get("time")) is not None), {})
        lead = finite(first.get("timing/step_s")) or finite(first.get("timing/eval_s")) or 0.0
        info.append(("wall time", f"{_duration(max(times) - min(times) + lead)} (from the metrics rows)"))
        info.append(("last row written", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(times)))))
    info.append(("output folder", str(out.resolve())))
    return info


def config_rows(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    offline = dotted(cfg, "algorithm.name") in OFFLINE_ALGORITHMS
    shown = []
    for key, online_only in KEY_CONFIG:
        value = dotted(cfg, key)
        if value is None or value == {} or value == [] or (online_only and offline):
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        shown.append((key, text if len(text) <= 200 else text[:200] + "…"))
    return shown


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{cells}</table>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1300px;padding:0 16px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:30px;border-bottom:1px solid #ddd}h3{font-size:15px}
table.kv{border-collapse:collapse}table.kv td{padding:2px 14px 2px 0;vertical-align:top}
table.kv td:first-child{color:#666;white-space:nowrap}.cols{display:flex;flex-wrap:wrap;gap:40px}
.charts{display:flex;flex-wrap:wrap;gap:18px}
figure{margin:0;border:1px solid #e3e3e3;border-radius:6px;padding:8px 10px;background:#fff}
figcaption{font-weight:600;margin-bottom:4px}svg.chart{display:block;max-width:100%;height:auto}
svg .grid{stroke:#eee}svg .frame{fill:none;stroke:#bbb}svg .tick,svg .axis{font-size:11px;fill:#555}
svg .line{fill:none;stroke-width:1.6}svg .band{opacity:.15;stroke:none}svg .pt:hover{stroke:#000;stroke-width:1.5}
.legend{font-size:12px;display:flex;flex-wrap:wrap;gap:4px 14px;margin-top:4px;max-width:600px}
.swatch{display:inline-block;width:18px;height:0;border-top:3px solid;vertical-align:middle;margin-right:5px}
.swatch.dashed{border-top-style:dashed}
.sample{border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:8px 12px;background:#fcfcfc}
.meta{font-size:13px;color:#444;margin-bottom:6px}.meta b{color:#000;text-transform:uppercase}
.turn{border-left:4px solid;margin:6px 0;padding:4px 8px;border-radius:3px}
.turn .role{font-size:12px;font-weight:600;color:#333}.facts{font-weight:400;color:#666}
.turn pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
.turn.trained{background:#eef8ee}.turn.untrained{border-left-style:dashed;background:#f3f3f3;color:#444}
.turn-key{border-left:4px solid;padding:0 6px;margin-right:6px}
.role-assistant{border-color:#2ca02c}.role-user{border-color:#1f77b4}.role-tool{border-color:#ff7f0e}
.role-system,.role-prompt{border-color:#7f7f7f}.role-other{border-color:#9467bd}
.badge{display:inline-block;font-size:11px;font-weight:400;padding:0 6px;border-radius:8px;margin-left:8px;background:#ddd}
.badge.trained{background:#2ca02c;color:#fff}.note{color:#8a5a00;font-weight:400}
"""


def render_report(output_dir: str | Path) -> str:
    """The page for the run in `output_dir`; InvalidInput naming the folder when it holds no metrics.jsonl."""
    out = Path(output_dir)
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        what = "is not a folder" if not out.is_dir() else "holds no metrics.jsonl"
        raise InvalidInput(f"report: {out} {what}; give the output_dir of a rayrlhf run (the folder where it writes "
                           "config.yaml, metrics.jsonl and samples/)")
    raw, partial = read_jsonl(metrics)
    rows = [r for r in raw if step_of(r) is not None]
    if len(rows) < len(raw):
        log.warning("%s: %d rows without an integer `step` left out", metrics, len(raw) - len(rows))
    cfg, cfg_note = read_config(out / "config.yaml")
    header = header_rows(out, rows, cfg)
    notes = [n for n in (cfg_note, "the last line of metrics.jsonl is still being written (left out)" if partial else None,
                         None if rows else "metrics.jsonl holds no rows yet") if n]
    charts = build_charts(rows)
    figures = "".join(f"<figure><figcaption>{escape(c.title)}</figcaption>{svg_chart(c)}{legend(c)}</figure>"
                      for c in charts) or '<p class="none">No figures yet.</p>'
    title = f"rayrlhf report: {header[0][1]}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{escape(title)}</title><style>{CSS}</style></head>'
            f"<body><h1>{escape(title)}</h1>"
            + "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
            + f'<div class="cols"><div><h2>Run</h2>{_table(header)}</div>'
            f"<div><h2>Key config values</h2>{_table(config_rows(cfg))}</div></div>"
            f'<h2>Curves</h2><p>x: training step. Hover a point for its exact value.</p><div class="charts">{figures}</div>'
            f"<h2>Sample transcripts</h2>{transcripts_section(out)}"
            f'<p class="note">Written {escape(time.strftime("%Y-%m-%d %H:%M:%S"))} by rayrlhf report.</p>'
            "</body></html>\n")


def write_report(output_dir: str | Path, out_file: str | Path | None = None) -> Path:
    """Write the page (default OUTPUT_DIR/report.html) atomically, so a browser never reads half a page."""
    target = Path(out_file) if out_file is not None else Path(output_dir) / "report.html"
    page = render_report(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target

