"""The results: a Markdown table on stdout, a JSON file and a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

BASELINES = ("rq", "simple", "celery")
BASELINE_LABELS = {"rq": "rq worker x2", "simple": "SimpleWorker x2", "celery": "Celery prefork -c2"}
#: A run during which other processes used this much of the CPU (% of all cores) is marked `+`.
BUSY_PERCENT = 10.0
SHORT = {"ours": "ours", "rq": "rq", "simple": "simple", "celery": "celery"}


def _number(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    if unit == "MB":
        return f"{value:.0f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _suffix(unit: str) -> str:
    return {"deliveries/s": "/s", "req/s": " req/s", "ms": " ms", "MB": " MB"}.get(unit, "")


def cell(entry: dict | None, unit: str) -> str:
    """`median (min-max)`; `*`: a run stopped at its time limit; `+`: other processes used the CPU meanwhile."""
    if not entry or entry.get("median") is None:
        return "failed" if entry and entry.get("runs") else "—"
    runs = entry.get("runs", [])
    partial = any(r.get("complete") is False for r in runs)
    shared = any((r.get("background_cpu_pct") or 0) >= BUSY_PERCENT for r in runs)
    text = f"{_number(entry['median'], unit)}{_suffix(unit)}"
    if entry.get("n", 0) > 1:
        text += f" ({_number(entry['min'], unit)}-{_number(entry['max'], unit)})"
    return text + ("*" if partial else "") + ("+" if shared else "")


def ratio_cell(row: dict) -> str:
    ours = row["setups"].get("ours", {}).get("median")
    parts = []
    for name in BASELINES:
        other = row["setups"].get(name, {}).get("median")
        if ours and other:
            ratio = ours / other if row["better"] == "higher" else other / ours
            parts.append(f"{ratio:.1f}x {SHORT[name]}" if ratio < 100 else f"{ratio:.0f}x {SHORT[name]}")
    return " · ".join(parts) or "—"


def per_setup_cell(row: dict, field: str, digits: int) -> str:
    """`field` of each setup that has it, like `ours 22.2 · simple 57.0`."""
    parts = []
    for name in ("ours", *BASELINES):
        value = row["setups"].get(name, {}).get(field)
        if value is not None:
            parts.append(f"{SHORT[name]} {value:.{digits}f}")
    return " · ".join(parts) or "—"


def calls_cell(row: dict) -> str:
    return per_setup_cell(row, "redis_calls_per_job", 1)


def cpu_cell(row: dict) -> str:
    """Worker CPU (user + system, ms) per delivered job: the drains only."""
    return per_setup_cell(row, "worker_cpu_ms_per_job", 2)


def met_cell(row: dict) -> str:
    if row.get("met") is None:
        return "n/a"
    return "yes" if row["met"] else "**no**"


HEADER = [
    "scenario",
    "ours",
    *BASELINE_LABELS.values(),
    "ours vs baseline",
    "Redis calls/job",
    "worker CPU ms/job",
    "target",
    "met?",
]


def table(rows: list[dict]) -> str:
    lines = [HEADER]
    for row in rows:
        unit = row["unit"]
        lines.append(
            [
                f"{row['title']} ({unit})",
                cell(row["setups"].get("ours"), unit),
                *(cell(row["setups"].get(name), unit) for name in BASELINES),
                ratio_cell(row),
                calls_cell(row),
                cpu_cell(row),
                row["target"],
                met_cell(row),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for index, line in enumerate(lines):
        out.append("| " + " | ".join(text.ljust(widths[i]) for i, text in enumerate(line)) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def notes(rows: list[dict]) -> list[str]:
    """What a reader needs beside the table: partial runs, failures, unmet preconditions."""
    result = []
    for row in rows:
        if row.get("same_runs_as"):
            continue  # a second figure from runs already described
        if row.get("note"):
            result.append(f"{row['title']}: {row['note']}")
        for entry in row["setups"].values():
            runs = entry.get("runs", [])
            failed = [r for r in runs + (entry.get("discarded_runs") or []) if "error" in r]
            if failed:
                result.append(f"{row['title']} / {entry['label']}: {len(failed)} run(s) failed: {failed[0]['error']}")
            busy = [r["background_cpu_pct"] for r in runs if (r.get("background_cpu_pct") or 0) >= BUSY_PERCENT]
            if busy:
                result.append(
                    f"{row['title']} / {entry['label']}: + in {len(busy)} of {len(runs)} run(s) other processes "
                    f"used up to {max(busy):.0f}% of the CPU"
                )
            repeated = entry.get("discarded_runs") or []
            if repeated:
                result.append(
                    f"{row['title']} / {entry['label']}: {len(repeated)} more run(s) were made because runs failed "
                    "or other processes used the CPU; the table uses the cleanest (all are in the JSON)"
                )
            partial = [r for r in runs if r.get("complete") is False]
            if partial:
                delivered = ", ".join(f"{r['delivered']}/{r['jobs']}" for r in partial)
                result.append(
                    f"{row['title']} / {entry['label']}: * {len(partial)} run(s) hit the time limit "
                    f"(delivered {delivered}); the rate is over what was delivered"
                )
    return result


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def chart(path: Path, rows: list[dict], title: str) -> bool:
    """Deliveries/s per setup and scenario, median with min-max whiskers; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # A row whose columns are not the setups of the legend (fan-out: its simple column is Dispatcher
    # delivering plain webhooks) says "chart": False.
    scenarios = [r for r in rows if r["unit"] == "deliveries/s" and r.get("chart", True)]
    if not scenarios:
        return False
    names = ["ours", *BASELINES]
    labels = {"ours": "Dispatcher worker x2", **BASELINE_LABELS}
    colors = {"ours": "#1f77b4", "rq": "#d62728", "simple": "#ff7f0e", "celery": "#2ca02c"}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    for offset, name in enumerate(names):
        xs, medians, low, high = [], [], [], []
        for x, row in enumerate(scenarios):
            entry = row["setups"].get(name)
            if not entry or entry.get("median") is None:
                continue
            xs.append(x + (offset - (len(names) - 1) / 2) * width)
            medians.append(entry["median"])
            low.append(entry["median"] - entry["min"])
            high.append(entry["max"] - entry["median"])
        if not xs:
            continue
        bars = ax.bar(xs, medians, width, yerr=[low, high], capsize=3, label=labels[name], color=colors[name])
        for bar, value, above in zip(bars, medians, high, strict=True):
            # Above the whisker, so the label never sits on it.
            ax.annotate(
                f"{value:,.0f}" if value >= 10 else f"{value:.1f}",
                (bar.get_x() + bar.get_width() / 2, value + above),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=8,
            )
    ax.set_yscale("log")
    ax.set_xticks(range(len(scenarios)))
    ax.set_xticklabels(
        [
            r["title"].replace(" from a full queue", "\nfrom a full queue").replace(" answering", "\nanswering")
            for r in scenarios
        ],
        fontsize=9,
    )
    ax.set_ylabel("deliveries/s (log scale; median, whiskers min-max)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
