"""The harness's files: every number as JSON (with FedFuse's per-level reports) and as CSV (one row per
setting and method, for spreadsheets and pandas)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from simulations.one_shot.methods import MethodOptions, Row
from simulations.one_shot.setting import Setting
from simulations.one_shot.summary import SummaryRow
from simulations.one_shot.sweep import SettingResult

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


def results_document(
    results: Sequence[SettingResult],
    summary: Sequence[SummaryRow],
    options: MethodOptions,
    command: str,
    seconds: float,
) -> dict[str, Any]:
    """Everything the run measured, as plain JSON-ready values.

    Keys: ``command`` (as typed), ``options`` (the methods run), ``seconds`` (the whole run's wall
    clock), ``settings`` (per setting: the `Setting`, the resolved evaluation size, the clients'
    label counts [K][C], every `Row`, FedFuse's reports by method, the Flower run's and the setting's
    seconds) and ``summary`` (the `SummaryRow`s over seeds).
    """
    return {
        "command": command,
        "options": asdict(options),
        "seconds": seconds,
        "settings": [
            {
                "setting": asdict(result.setting),
                "evaluation_size": result.evaluation_size,
                "label_counts": result.label_counts.tolist(),
                "rows": [asdict(row) for row in result.comparison.rows],
                "fusion_reports": result.comparison.fusion_reports,
                "flower_seconds": result.flower_seconds,
                "seconds": result.seconds,
            }
            for result in results
        ],
        "summary": [asdict(row) for row in summary],
    }


def write_json(folder: Path, document: dict[str, Any]) -> Path:
    path = folder / RESULTS_JSON
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def write_csv(folder: Path, results: Sequence[SettingResult]) -> Path:
    """One line per (setting, method): the setting's fields (``evaluation_size`` resolved to the examples
    evaluated on, where the setting left it to the default), then the row's. Every column once."""
    path = folder / RESULTS_CSV
    columns = [f.name for f in fields(Setting)] + [f.name for f in fields(Row)]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for result in results:
            for row in result.comparison.rows:
                writer.writerow(
                    {**asdict(result.setting), "evaluation_size": result.evaluation_size, **asdict(row)}
                )
    return path
