"""Tables, target checks, profile summary and plot of benchmarks/serving.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from serving import LevelResult, Results

SERVICE = "service"
UNBATCHED = "service, max_batch_size=1"
PEER = "BentoML"
PROFILE_ROWS = 15


def saturation(levels: list[LevelResult]) -> float:
    """Return the highest throughput in images/s over the concurrency levels."""
    return max(level.summary.images_per_s for level in levels)


def check_targets(results: Results) -> list[tuple[str, float, float, bool]]:
    """Return (target, measured, bound, met) for each target that was measured."""
    service = saturation(results.levels[SERVICE])
    limit = results.limit[str(results.max_batch_size)]
    rows = [("batched service / onnxruntime batched", service / limit, 0.7, True)]
    if UNBATCHED in results.levels:
        unbatched = saturation(results.levels[UNBATCHED])
        rows.append(
            ("batched service / unbatched service", service / unbatched, 2.0, True)
        )
    if PEER in results.levels:
        peer = saturation(results.levels[PEER])
        rows.append(("batched service / BentoML", service / peer, 1.5, True))
    if results.half_load is not None and results.half_load.summary.latency_ms:
        p99 = results.half_load.summary.latency_ms["p99"] / 1000
        rows.append(
            (
                "p99 at half load / one batch's inference",
                p99 / results.batch_seconds,
                4.0,
                False,
            )
        )
    return [
        (name, value, bound, value >= bound if higher else value < bound)
        for name, value, bound, higher in rows
    ]


def write_report(results: Results, path: Path) -> str:
    """Write the Markdown tables of a run to ``path`` and return them."""
    sections = [
        _setup(results),
        _limit_table(results),
        _levels_table(results),
        _ratio_table(results),
        _half_load(results),
        _targets_table(results),
    ]
    if results.profile:
        sections.append(summarize_profile(Path(results.profile)))
    text = "\n\n".join(section for section in sections if section) + "\n"
    path.write_text(text)
    return text


def _setup(results: Results) -> str:
    machine = results.machine
    versions = ", ".join(
        f"{name} {machine[name]}"
        for name in ("onnxruntime", "locust", "fastapi", "uvicorn", "starlette")
    )
    return (
        f"Command: `{results.command}`\n\n"
        f"Machine: {machine['cpu']}, {machine['cores']} cores; Python "
        f"{machine['python']}, {versions}. 1-minute load average at the start: "
        f"{machine['load_average_at_start']}."
    )


def _limit_table(results: Results) -> str:
    lines = [
        "| onnxruntime alone | images/s | ms per batch |",
        "| --- | ---: | ---: |",
    ]
    for variant, rate in results.limit_by_spinning.items():
        batch = int(variant.split(",")[0])
        lines.append(f"| batch {variant} | {rate:.1f} | {batch / rate * 1000:.1f} |")
    return "\n".join(lines)


def _levels_table(results: Results) -> str:
    lines = [
        "| server | users | images/s | p50 ms | p95 ms | p99 ms | errors | rejected "
        "| server cores | event loop cores | Locust cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, levels in results.levels.items():
        for level in levels:
            lines.append(f"| {name} | {_level_cells(level)} |")
    return "\n".join(lines)


def _level_cells(level: LevelResult) -> str:
    summary = level.summary
    latency = summary.latency_ms
    loop = f"{level.event_loop_cores:.2f}" if level.event_loop_cores else "n/a"
    return (
        f"{level.concurrency} | {summary.images_per_s:.1f} | "
        f"{latency.get('p50', 0):.0f} | {latency.get('p95', 0):.0f} | "
        f"{latency.get('p99', 0):.0f} | {summary.errors} | "
        f"{sum(summary.rejected.values())} | {level.server_cores:.2f} | {loop} | "
        f"{level.generator_cores:.2f}"
    )


def _ratio_table(results: Results) -> str:
    """Throughput and latency of the batched service as ratios, per level."""
    limit = results.limit[str(results.max_batch_size)]
    batch_ms = results.batch_seconds * 1000
    others = {
        name: levels for name, levels in results.levels.items() if name != SERVICE
    }
    header = "| users | images/s ÷ limit | p50 ÷ batch time | p99 ÷ batch time |"
    rule = "| ---: | ---: | ---: | ---: |"
    for name in others:
        header += f" images/s ÷ {name} | p50 ÷ {name} | p99 ÷ {name} |"
        rule += " ---: | ---: | ---: |"
    lines = [header, rule]
    for index, level in enumerate(results.levels[SERVICE]):
        summary = level.summary
        row = (
            f"| {level.concurrency} | {summary.images_per_s / limit:.2f} | "
            f"{summary.latency_ms['p50'] / batch_ms:.2f} | "
            f"{summary.latency_ms['p99'] / batch_ms:.2f} |"
        )
        for levels in others.values():
            other = levels[index].summary
            row += (
                f" {_ratio(summary.images_per_s, other.images_per_s)} | "
                f"{_ratio(summary.latency_ms['p50'], other.latency_ms.get('p50'))} | "
                f"{_ratio(summary.latency_ms['p99'], other.latency_ms.get('p99'))} |"
            )
        lines.append(row)
    return "\n".join(lines)


def _ratio(value: float, other: float | None) -> str:
    return f"{value / other:.2f}" if other else "n/a"


def _half_load(results: Results) -> str:
    if results.half_load is None:
        return ""
    summary = results.half_load.summary
    latency = summary.latency_ms
    return (
        f"Half load: {results.half_load_rate:.1f} requests/s at a fixed rate from "
        f"{results.half_load.concurrency} users gave {summary.images_per_s:.1f} "
        f"images/s, p50 {latency.get('p50', 0):.0f} ms, p95 "
        f"{latency.get('p95', 0):.0f} ms, p99 {latency.get('p99', 0):.0f} ms; one "
        f"batch of {results.max_batch_size} takes {results.batch_seconds * 1000:.1f} "
        "ms in onnxruntime alone."
    )


def _targets_table(results: Results) -> str:
    lines = ["| target | measured | bound | met |", "| --- | ---: | ---: | --- |"]
    for name, value, bound, met in check_targets(results):
        relation = "<" if "p99" in name else ">="
        answer = "yes" if met else "no"
        lines.append(f"| {name} | {value:.2f} | {relation} {bound:g} | {answer} |")
    return "\n".join(lines)


def summarize_profile(path: Path) -> str:
    """Tabulate py-spy's raw samples by thread, and the event loop's by package.

    A sample counts for the package of its innermost frame, so the event
    loop's table shows where its own CPU time goes.
    """
    threads: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        thread = _thread_kind(frames)
        threads[thread] += count
        if thread == "event loop":
            packages[_package(frames[-1])] += count
    lines = [
        f"py-spy samples by thread ({total} samples of threads running Python):",
        "",
        "| thread | share |",
        "| --- | ---: |",
    ]
    for thread, count in threads.most_common():
        lines.append(f"| {thread} | {count / total:.1%} |")
    lines += ["", "| event loop, innermost frame in | share of all samples |"]
    lines.append("| --- | ---: |")
    for package, count in packages.most_common(PROFILE_ROWS):
        lines.append(f"| {package} | {count / total:.1%} |")
    return "\n".join(lines)


def _package(frame: str) -> str:
    """Return the top-level package of a py-spy frame "function (path/file.py:1)"."""
    location = frame.rsplit(" (", 1)[-1].rstrip(")")
    path = location.rsplit(":", 1)[0]
    if path.startswith("<"):
        return path
    parts = path.split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    return parts[0].removesuffix(".py") if len(parts) > 1 else "stdlib " + parts[0]


def _thread_kind(frames: list[str]) -> str:
    joined = ";".join(frames)
    if "Session.run" in joined:
        return "inference (onnxruntime)"
    if "Runner.run" in joined or "run_until_complete" in joined:
        return "event loop"
    if "_worker" in joined or "WorkerThread" in joined:
        return "worker threads (decoding, waiting)"
    return "other"


def write_plot(results: Results, path: Path) -> None:
    """Plot throughput and p99 latency against concurrency for every server."""
    figure, (throughput, p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in results.levels.items():
        users = [level.concurrency for level in levels]
        throughput.plot(
            users, [lv.summary.images_per_s for lv in levels], "o-", label=name
        )
        p99.plot(
            users, [lv.summary.latency_ms.get("p99") for lv in levels], "o-", label=name
        )
    for batch, rate in results.limit.items():
        throughput.axhline(rate, linestyle="--", color="grey", linewidth=1)
        throughput.annotate(
            f"onnxruntime alone, batch {batch}", (1, rate), fontsize=8, va="bottom"
        )
    bound = 4 * results.batch_seconds * 1000
    p99.axhline(bound, linestyle=":", color="grey", linewidth=1)
    p99.annotate("4 x one batch's inference", (1, bound), fontsize=8, va="bottom")
    for axis, label in ((throughput, "images/s"), (p99, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        levels = next(iter(results.levels.values()))
        axis.set_xticks([level.concurrency for level in levels])
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel("concurrent users (one image per request)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    p99.set_yscale("log")
    if results.half_load is not None and results.half_load.summary.latency_ms:
        half_load_p99 = results.half_load.summary.latency_ms["p99"]
        p99.axhline(half_load_p99, linestyle="-.", color="tab:blue", linewidth=1)
        p99.annotate(
            f"service at half load ({results.half_load_rate:.0f} requests/s)",
            (1, half_load_p99),
            fontsize=8,
            va="top",
        )
    throughput.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
