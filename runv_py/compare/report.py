"""Rendering `runv-py compare` results: a terminal table, a PNG chart, an HTML report.

matplotlib is imported only here, and only when a chart is drawn (the `compare` extra).
"""
import base64
import html as html_lib
import os


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def rows(results: dict) -> tuple:
    """(header, rows of cells): one row per measure, one column per runtime."""
    names = list(results["runtimes"])
    header = ["measure"] + names
    body = []
    for key, meta in results["measures"].items():
        row = [f"{meta['label']} ({meta['unit']})"]
        for name in names:
            m = results["runtimes"][name]["measures"].get(key)
            row.append(_fmt(m["median"]) if m else "n/a")
        body.append(row)
    return header, body


def isolation_rows(results: dict) -> tuple:
    names = list(results["runtimes"])
    questions = []
    for name in names:
        for q in results["runtimes"][name].get("isolation") or {}:
            if q not in questions:
                questions.append(q)
    body = [[q] + [(results["runtimes"][n].get("isolation") or {}).get(q, "n/a") for n in names]
            for q in questions]
    return ["probe"] + names, body


def _text_table(header: list, body: list) -> str:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def table(results: dict) -> str:
    """The terminal report: medians per runtime, then the isolation probes."""
    parts = [f"runv-py compare: {results['bundle']}, {results['runs']} runs, host kernel "
             f"{results['host']['kernel']} ({results['host']['cpus']} CPUs)", "",
             _text_table(*rows(results))]
    for name, data in results["runtimes"].items():
        if data.get("error"):
            parts.append(f"\n{name}: FAILED: {data['error']}")
    for name, why in results.get("skipped", {}).items():
        parts.append(f"{name}: skipped: {why}")
    parts += ["", "isolation probes (what a container sees):", ""]
    header, body = isolation_rows(results)
    # Probe answers are long: one block per runtime reads better than a wide table.
    for col, name in enumerate(header[1:], start=1):
        parts.append(f"  {name}")
        parts += [f"    {r[0]}: {r[col]}" for r in body]
    return "\n".join(parts)


def chart(results: dict, path: str) -> str:
    """Latency distributions (start-to-exit, exec) per runtime, log scale; returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    names = [n for n, d in results["runtimes"].items() if d["measures"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for ax, key in zip(axes, ("start_to_exit_ms", "exec_ms")):
        data = [results["runtimes"][n]["measures"].get(key, {}).get("values") or [float("nan")]
                for n in names]
        ax.boxplot(data, vert=True, showfliers=False)
        for i, values in enumerate(data, start=1):
            ax.scatter([i + (j % 5 - 2) * 0.04 for j in range(len(values))], values, s=10,
                       alpha=0.6, zorder=3)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels([n.replace("runv-py ", "runv-py\n") for n in names], fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        for i, (name, values) in enumerate(zip(names, data), start=1):
            median = results["runtimes"][name]["measures"].get(key, {}).get("median")
            if median is not None:
                ax.annotate(f"{median:.0f} ms", (i, max(values)), textcoords="offset points",
                            xytext=(0, 5), ha="center", fontsize=8)
        ax.margins(y=0.15)
        ax.set_ylabel("ms (log scale)")
        ax.set_title(results["measures"][key]["label"], fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(f"runv-py compare, {results['runs']} runs, {results['host']['cpus']} CPUs, "
                 f"kernel {results['host']['kernel']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _html_table(header: list, body: list) -> str:
    esc = html_lib.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"


def html(results: dict, png_path: str, path: str) -> str:
    """One self-contained HTML file: the table, the chart inline, the probes; returns path."""
    if png_path:
        with open(png_path, "rb") as f:
            png = base64.b64encode(f.read()).decode()
        figure = f'<img alt="latency distributions" src="data:image/png;base64,{png}">'
    else:
        figure = ("<p>No chart: matplotlib is not installed "
                  "(<code>pip install 'runv-py[compare]'</code>).</p>")
    esc = html_lib.escape
    host = results["host"]
    notes = "".join(f"<li>{esc(n)}: skipped: {esc(w)}</li>" for n, w in results.get("skipped", {}).items())
    notes += "".join(f"<li>{esc(n)}: failed: {esc(d['error'])}</li>"
                     for n, d in results["runtimes"].items() if d.get("error"))
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>runv-py compare</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:.3em .6em}}
td:not(:first-child){{text-align:right}}th{{background:#eee}}
table.probes td{{text-align:left}}</style></head><body>
<h1>runv-py compare</h1>
<p>Bundle <code>{esc(results['bundle'])}</code>, {results['runs']} runs per latency figure; host
kernel {esc(host['kernel'])}, {host['cpus']} CPUs ({esc(host['cpu_model'])}),
{host['mem_total_kb'] // 1024} MiB. Figures are medians.</p>
<h2>Measurements</h2>
{_html_table(*rows(results))}
<ul>{notes}</ul>
<h2>Latency distributions</h2>
{figure}
<h2>Isolation probes</h2>
{_html_table(*isolation_rows(results)).replace('<table>', '<table class="probes">', 1)}
</body></html>
"""
    with open(path, "w") as f:
        f.write(doc)
    return os.path.abspath(path)
