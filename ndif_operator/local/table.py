"""The model table local mode prints: what was asked, what was granted, and whether it serves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ndif_operator.api import Level, units
from ndif_operator.api.naming import model_app_name, model_key
from ndif_operator.local.pipeline import LocalPlan
from ndif_operator.local.serve_rest import AppProgress

HEADERS = ("DEPLOYMENT", "MODEL KEY", "WANTED", "GRANTED", "REPLICAS", "MEMORY", "APP", "REASON")


def human_bytes(value: int | None) -> str:
    return "?" if value is None else units.human_bytes(value)


def table_rows(local_plan: LocalPlan, progress: Mapping[str, AppProgress]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for key in sorted(local_plan.deployments):
        md = local_plan.deployments[key]
        decision = local_plan.plan.by_key.get(key)
        granted = str(decision.level) if decision else "-"
        app_name = model_app_name(*key.split("/", 1))
        app = progress.get(app_name)
        if decision is not None and decision.level == Level.COLD:
            app_state = "-"  # no application for a COLD model, by design
        else:
            app_state = app.status if app else "MISSING"
        sized = local_plan.estimates.get(key)
        reason = str(decision.reason) if decision else "NotPlanned"
        if key in local_plan.estimate_errors:
            reason = f"{reason} (unsized: {local_plan.estimate_errors[key]})"
        elif decision is not None and decision.message:
            reason = f"{reason}: {decision.message}"
        rows.append((
            key,
            model_key(md.spec.model.repo_id),
            str(md.spec.level),
            granted,
            str(decision.replicas if decision else 0),
            human_bytes(sized.total_bytes if sized else None),
            app_state,
            reason,
        ))  # fmt: skip
    return rows


def format_table(rows: Sequence[Sequence[str]], headers: Sequence[str] = HEADERS) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in [headers, *rows]]
    return "\n".join(lines)


CPU_ONLY_NOTE = "(no GPU here: the planner's one \"GPU\" is this machine's RAM; replicas run on the CPU)"


def model_table(local_plan: LocalPlan, progress: Mapping[str, AppProgress]) -> str:
    table = format_table(table_rows(local_plan, progress))
    return f"{table}\n{CPU_ONLY_NOTE}" if local_plan.cpu_only else table
