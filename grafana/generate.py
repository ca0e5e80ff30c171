"""Generates memwatch's Grafana dashboard from Grafana's own typed models.

The dashboard is built with ``grafana-foundation-sdk`` (Grafana's generated Python builders, in
the ``test`` extra) and written to ``grafana/dashboards/memwatch.json``, which is committed so
that nobody needs the SDK to import or provision it. Edit this file, never the JSON::

    .venv/bin/python grafana/generate.py           # rewrite the JSON
    .venv/bin/python grafana/generate.py --check   # exit 1 if the committed JSON is stale

``tests/test_grafana.py`` regenerates and compares, parses every panel query with promtool, and
``tests/integration/test_prometheus.py`` runs every query on a real Prometheus scraping a real
leaking service. docs/grafana.md says what each panel shows and what to do when it turns red.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "memwatch.json"
UID = "memwatch"

# Every panel reads the datasource picked in the $datasource variable.
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label filters. Every query carries TARGET, so the job and instance pickers apply everywhere;
# metrics labelled by route or auth scheme also take the route and auth pickers.
TARGET = 'job=~"$job", instance=~"$instance"'
AUTH = TARGET + ', auth=~"$auth"'
ROUTE = AUTH + ', route=~"$route"'

WORKER_LEGEND = "{{instance}} pid {{pid}}"
ROUTE_LEGEND = "{{method}} {{route}} ({{auth}})"

GREEN_RED = (
    dash.ThresholdsConfig()
    .mode(models.ThresholdsMode.ABSOLUTE)
    .steps([models.Threshold(value=None, color="green"), models.Threshold(value=1, color="red")])
)


def _verdict_mapping(zero: str, one: str, one_color: str = "red") -> list[models.ValueMapping]:
    return [
        models.ValueMap(
            options={
                "0": models.ValueMappingResult(text=zero, color="green", index=0),
                "1": models.ValueMappingResult(text=one, color=one_color, index=1),
            }
        )
    ]


def query(expr: str, legend: str = "__auto", ref_id: str = "A") -> prometheus.Dataquery:
    """A range query (for graphs)."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).range()


def instant(
    expr: str, ref_id: str = "A", fmt: PromQueryFormat | None = None
) -> prometheus.Dataquery:
    """An instant query (for stats and tables)."""
    q = prometheus.Dataquery().expr(expr).ref_id(ref_id).instant()
    return q.format(fmt) if fmt is not None else q


def legend_table() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
        .sort_by("Last *")
        .sort_desc(True)
    )


def multi_tooltip() -> common_builders.VizTooltipOptions:
    return (
        common_builders.VizTooltipOptions()
        .mode(common.TooltipDisplayMode.MULTI)
        .sort(common.SortOrder.DESCENDING)
    )


def graph(title: str, description: str, unit: str, width: int = 12) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .legend(legend_table())
        .tooltip(multi_tooltip())
        .fill_opacity(10)
        .line_width(1)
    )


def big_number(title: str, description: str, expr: str) -> stat.Panel:
    """A stat that is green at 0 and red from 1."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(instant(expr))
        .span(6)
        .height(4)
        .unit("short")
        .decimals(0)
        .thresholds(GREEN_RED)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def states(
    title: str, description: str, expr: str, zero: str, one: tuple[str, str], width: int
) -> statetimeline.Panel:
    """A 0/1 gauge per worker as coloured bands over time; ``one`` is (text, colour)."""
    return (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(query(expr, WORKER_LEGEND))
        .span(width)
        .height(8)
        .mappings(_verdict_mapping(zero, *one))
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .fill_opacity(80)
        .legend(common_builders.VizLegendOptions().show_legend(False))
    )


def variables() -> list[Builder[models.VariableModel]]:
    def picker(name: str, label: str, expr: str, description: str) -> dash.QueryVariable:
        return (
            dash.QueryVariable(name)
            .label(label)
            .description(description)
            .datasource(DATASOURCE)
            .query(f"label_values({expr}, {name})")
            .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(models.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
            .multi(True)
            .include_all(True)
            # "All" is a regex that also matches series that appear after the page loaded.
            .all_value(".*")
            .current(models.VariableOption(selected=True, text="All", value="$__all"))
        )

    return [
        dash.DatasourceVariable("datasource")
        .label("Data source")
        .description("The Prometheus that scrapes memwatch's /metrics.")
        .type("prometheus"),
        picker(
            "job",
            "Job",
            "memwatch_leak_suspected",
            "Prometheus scrape jobs that serve memwatch metrics.",
        ),
        picker(
            "instance",
            "Instance",
            'memwatch_leak_suspected{job=~"$job"}',
            "Scrape targets: one per service process, or per gunicorn/uvicorn master.",
        ),
        picker(
            "route",
            "Route",
            f"memwatch_requests_total{{{TARGET}}}",
            "Route templates (or normalised paths) memwatch has counted.",
        ),
        picker(
            "auth",
            "Auth",
            f"memwatch_requests_total{{{TARGET}}}",
            "Authentication schemes: bearer, basic, digest, apikey, session, other, anonymous.",
        ),
    ]


def build() -> dash.Dashboard:
    d = (
        dash.Dashboard("memwatch: memory leaks")
        .uid(UID)
        .description(
            "Memory leaks in Python web services watched by memwatch: verdict per worker, "
            "memory per worker, growth, retained bytes by route and auth path, and memwatch's "
            "own health. Panel guide: docs/grafana.md."
        )
        .tags(["memwatch", "memory", "python"])
        .editable()
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .time("now-3h", "now")
        .timezone("browser")
        .refresh("30s")
        .variables(variables())
    )

    d = d.with_row(dash.Row("Verdict"))
    d = d.with_panel(
        big_number(
            "Workers suspected of leaking",
            "Processes (gunicorn/uvicorn workers, or single processes) whose memory memwatch "
            "suspects of leaking now. Red: open the memwatch report of that instance.",
            f"sum(memwatch_leak_suspected{{{TARGET}}})",
        )
    )
    d = d.with_panel(
        big_number(
            "Routes suspected of leaking",
            "Distinct (route, method, auth) suspected of retaining memory in at least one "
            "worker. Red: see 'Routes: retained bytes and verdict'.",
            "count(max by (route, method, auth) "
            f"(memwatch_route_leak_suspected{{{ROUTE}}}) == 1) or vector(0)",
        )
    )
    d = d.with_panel(
        big_number(
            "Leak alerts raised (time range)",
            "How many times a worker's verdict turned to 'leak suspected' during the dashboard's "
            "time range (memwatch_leak_alerts_total, summed over workers).",
            # increase() extrapolates to the range's edges: round to whole alerts.
            f"round(sum(increase(memwatch_leak_alerts_total{{{TARGET}}}[$__range])))",
        )
    )
    d = d.with_panel(
        big_number(
            "memwatch internal errors (time range)",
            "memwatch's own caught failures during the time range. Requests were served; red "
            "means memwatch's numbers may be incomplete: read the service log.",
            f"round(sum(increase(memwatch_internal_errors_total{{{TARGET}}}[$__range])))",
        )
    )
    d = d.with_panel(
        states(
            "Leak verdict per instance and worker",
            "memwatch_leak_suspected per worker (pid) over time: green no leak, red leak "
            "suspected. A worker that leaks stays red until it is recycled or the growth stops.",
            f"max by (job, instance, pid) (memwatch_leak_suspected{{{TARGET}}})",
            "no leak",
            ("leak suspected", "red"),
            24,
        )
    )

    d = d.with_row(dash.Row("Memory per worker"))
    d = d.with_panel(
        graph(
            "Resident memory (RSS) per worker",
            "Resident set size of each worker. RSS only ratchets up in steps; a steady climb "
            "after warm-up is what a leak looks like from the outside.",
            "bytes",
        ).with_target(query(f"memwatch_process_resident_memory_bytes{{{TARGET}}}", WORKER_LEGEND))
    )
    d = d.with_panel(
        graph(
            "Python heap blocks per worker",
            "Allocated Python heap blocks (sys.getallocatedblocks): memwatch's sharpest signal, "
            "immune to allocator fragmentation. A sawtooth is gc; a rising floor is a leak.",
            "short",
        ).with_target(query(f"memwatch_python_heap_blocks{{{TARGET}}}", WORKER_LEGEND))
    )
    d = d.with_panel(
        graph(
            "Growth rate per signal",
            "Sustained growth per second by signal (heap, rss), the Theil-Sen slope over "
            "memwatch's detector window; 0 while there is no significant trend.",
            "Bps",
        ).with_target(
            query(
                f"memwatch_growth_bytes_per_second{{{TARGET}}}",
                "{{signal}} · " + WORKER_LEGEND,
            )
        )
    )
    d = d.with_panel(
        graph(
            "Growth per request per signal",
            "Sustained growth per request by signal: how many bytes each request leaves "
            "behind on average, all routes together.",
            "bytes",
        ).with_target(
            query(
                f"memwatch_growth_bytes_per_request{{{TARGET}}}",
                "{{signal}} · " + WORKER_LEGEND,
            )
        )
    )

    d = d.with_row(dash.Row("Routes and authentication"))
    d = d.with_panel(
        graph(
            "Retained bytes per request by route and auth (top 10)",
            "memwatch's estimate of the bytes each request leaves in memory, per route, method "
            "and auth scheme (largest over workers); the ten largest. A leaking path stands "
            "well above the rest.",
            "bytes",
        ).with_target(
            query(
                "topk(10, max by (route, method, auth) "
                f"(memwatch_route_retained_bytes_per_request{{{ROUTE}}}))",
                ROUTE_LEGEND,
            )
        )
    )
    d = d.with_panel(
        table.Panel()
        .title("Routes: retained bytes and verdict")
        .description(
            "Per route, method and auth scheme: retained bytes per request (largest over "
            "workers) and whether memwatch suspects that path of leaking (in any worker)."
        )
        .datasource(DATASOURCE)
        .span(12)
        .height(8)
        .with_target(
            instant(
                "max by (route, method, auth) "
                f"(memwatch_route_retained_bytes_per_request{{{ROUTE}}})",
                "A",
                PromQueryFormat.TABLE,
            )
        )
        .with_target(
            instant(
                f"max by (route, method, auth) (memwatch_route_leak_suspected{{{ROUTE}}})",
                "B",
                PromQueryFormat.TABLE,
            )
        )
        .with_transformation(models.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            models.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "indexByName": {
                        "route": 0,
                        "method": 1,
                        "auth": 2,
                        "Value #A": 3,
                        "Value #B": 4,
                    },
                    "renameByName": {
                        "Value #A": "retained bytes/request",
                        "Value #B": "leak suspected",
                    },
                },
            )
        )
        .override_by_name("retained bytes/request", [models.DynamicConfigValue("unit", "bytes")])
        .override_by_name(
            "leak suspected",
            [
                models.DynamicConfigValue("mappings", _verdict_mapping("no", "LEAK")),
                models.DynamicConfigValue("custom.cellOptions", {"type": "color-background"}),
            ],
        )
        .sort_by(
            [
                common_builders.TableSortByFieldState()
                .display_name("retained bytes/request")
                .desc(True)
            ]
        )
    )
    d = d.with_panel(
        graph(
            "Requests by route, auth and outcome",
            "Request rate per route, method, auth scheme and outcome (ok, rejected = 401/403, "
            "client_error, server_error). Read it next to the retained bytes: a leak that "
            "follows one path's traffic names that path.",
            "reqps",
        ).with_target(
            query(
                "sum by (route, method, auth, outcome) "
                f"(rate(memwatch_requests_total{{{ROUTE}}}[$__rate_interval]))",
                "{{method}} {{route}} ({{auth}}, {{outcome}})",
            )
        )
    )
    d = d.with_panel(
        graph(
            "Distinct credentials by auth scheme",
            "Distinct credentials each worker has seen, per scheme (HyperLogLog of keyed "
            "hashes, never the credentials). Growth that follows this line, rather than the "
            "request rate, points at a cache keyed by token. Schemes never seen are hidden.",
            "short",
        ).with_target(
            query(
                f"memwatch_distinct_credentials{{{AUTH}}} > 0",
                "{{auth}} · " + WORKER_LEGEND,
            )
        )
    )

    d = d.with_row(dash.Row("memwatch itself"))
    d = d.with_panel(
        states(
            "Diagnosis windows (tracemalloc active)",
            "When tracemalloc is tracing in a worker: a diagnosis window, opened when a leak "
            "is suspected or on demand, bounded in time and duty cycle. Requests are slower "
            "inside a window.",
            f"max by (job, instance, pid) (memwatch_tracemalloc_active{{{TARGET}}})",
            "off",
            ("tracing", "blue"),
            8,
        )
    )
    d = d.with_panel(
        graph(
            "Memory traced during diagnosis",
            "Memory traced by tracemalloc in each worker (0 outside diagnosis windows): the "
            "extra memory a window costs.",
            "bytes",
            8,
        ).with_target(query(f"memwatch_traced_memory_bytes{{{TARGET}}}", WORKER_LEGEND))
    )
    d = d.with_panel(
        graph(
            "Internal errors",
            "memwatch's own caught failures per instance. Should be flat at 0; anything else "
            "is a memwatch bug worth reporting with the service log.",
            "short",
            8,
        ).with_target(
            query(
                "sum by (job, instance) "
                f"(increase(memwatch_internal_errors_total{{{TARGET}}}[$__rate_interval]))",
                "{{instance}}",
            )
        )
    )
    return d


def number_panels(model: models.Dashboard) -> None:
    """Stable panel ids, in layout order (Grafana needs them unique for links and repeats)."""
    for number, panel in enumerate(model.panels or [], start=1):
        panel.id_val = number


def render() -> str:
    model = build().build()
    number_panels(model)
    return json.dumps(model, cls=JSONEncoder, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
