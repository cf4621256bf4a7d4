"""Run set-up, the same for every engine (V1, the size budget's loop, the block-swap engine and
the dry run): validate the config, pair the models with the selection, resolve the key style,
and open the report with every key left out of the pairing."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ExtractConfig
from .key_style import resolve_for_plan
from .layer import layer_kind
from .pairing import PairPlan
from .plan_options import plan_for
from .report import STATUS_SKIPPED, ExtractionReport, LayerReport
from .sources import WeightSource


@dataclass
class RunSetup:
    cfg: ExtractConfig        # validated, with the key style resolved
    plan: PairPlan
    report: ExtractionReport
    notes: list[str]          # the key style's notes (also in the report)


def set_up_run(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig) -> RunSetup:
    """Validate, pair, resolve the key style and open the report; raises
    :class:`ExtractionInputError` for bad input before any layer is read."""
    cfg.validate()
    plan = plan_for(base, tuned, cfg)
    cfg, notes = resolve_for_plan(cfg, plan)
    return RunSetup(cfg=cfg, plan=plan, report=new_report(cfg, plan, notes), notes=notes)


def new_report(cfg: ExtractConfig, plan: PairPlan, notes: list[str]) -> ExtractionReport:
    """A run's report before any layer: the config, the notes, and every key left out of the
    pairing with its reason (nothing is dropped silently)."""
    report = ExtractionReport(config=cfg.to_dict(), notes=list(notes), inputs=list(plan.inputs))
    if plan.selection is not None:
        report.notes.extend(plan.selection.note_lines())
    for key, shape, reason in plan.left_out:
        report.add(LayerReport(key=key, shape=list(shape), kind=layer_kind(shape),
                               status=STATUS_SKIPPED, reason=reason))
    return report
