"""`runv-py compare`: one bundle under the VM driver, the namespace driver and runc.

The command only; the measuring (``measure``) and the rendering (``report``,
matplotlib) are imported when it runs, so CLI start-up does not pay
for them.
"""
import os

import click


@click.command("compare")
@click.option("-b", "--bundle", required=True, help="OCI bundle to run under every runtime.")
@click.option("--runs", default=10, show_default=True, type=click.IntRange(1, 1000),
              help="Repetitions of each latency measurement.")
@click.option("--out", "out_dir", default="runv-compare", show_default=True,
              help="Directory for compare.json, compare.png and report.html.")
@click.option("--tree-files", default=10000, show_default=True, type=click.IntRange(100, 10 ** 6),
              help="Files in the tree `find` walks.")
@click.option("--tar-mb", default=50, show_default=True, type=click.IntRange(1, 10000),
              help="Size of the archive `tar x` unpacks.")
@click.pass_obj
def compare(opts, bundle: str, runs: int, out_dir: str, tree_files: int, tar_mb: int) -> None:
    """Compare VM isolation, namespace isolation and runc on one bundle."""
    from . import measure as compare_measure, report as compare_report
    if not os.path.isfile(os.path.join(bundle, "config.json")):
        raise click.ClickException(f"{bundle}: config.json not found")
    # The global --template DIR (if this runv-py has it) names the template row's template.
    template_dir = click.get_current_context().meta.get("runv_py.template") or ""
    results = compare_measure.compare_bundle(opts, bundle, runs, out_dir, template_dir,
                                             tree_files, tar_mb)
    click.echo(compare_report.table(results))
    try:
        png = compare_report.chart(results, os.path.join(out_dir, "compare.png"))
    except ImportError:
        png = ""
        click.echo("runv-py: no chart: matplotlib is missing (pip install 'runv-py[compare]')",
                   err=True)
    html = compare_report.html(results, png, os.path.join(out_dir, "report.html"))
    written = [os.path.join(out_dir, "compare.json")] + ([png] if png else []) + [html]
    click.echo(f"\nwrote {', '.join(written)}")
