"""The evaluation seam: what ``compare`` tabulates and plots, and ``prune`` reports dense vs pruned.

An ``Evaluation`` measures a model (``measure``), says how it measured (``describe``, what
results.json records as ``"evaluation"``) and declares its figures as ``Column``s (title, number
format, plot scale). compare's grid, tables and plot and the prune command's report and summary
work through these alone, so a new evaluation is one subclass in ``numprune/evaluate/`` plus its
name on the command line (``numprune/cli/inputs.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Column:
    """One figure of an evaluation as a results column: a table column, a CSV field and a plot panel."""

    key: str  # the figure's name in what ``measure`` returns
    title: str  # the table header and the panel's title
    number_format: str  # format spec of a value, e.g. ".2f" or ".1%"
    csv_name: str | None = None  # the CSV header (default: ``key``)
    quantity: str | None = None  # what the plot's y axis shows (default: ``title``)
    log_scale: bool = False

    def format(self, value: float) -> str:
        return format(value, self.number_format)

    @property
    def csv_header(self) -> str:
        return self.csv_name or self.key

    @property
    def axis_label(self) -> str:
        quantity = self.quantity or self.title
        return f"{quantity} (log scale)" if self.log_scale else quantity


@dataclass(frozen=True)
class Measurement:
    """The figures of one model (``{column key: value}``, possibly more than the columns show) and what else
    the evaluation keeps of it for its pictures (``write_artefacts``), or None."""

    figures: dict[str, float]
    artefact: object = None


class Evaluation(ABC):
    """How dense and pruned models are measured, built once and applied to every model of a run."""

    row_key: str  # the field of a compare row (results.json) that holds the figures
    report_key: str  # the field of pruning_report.json that holds the dense-vs-pruned record
    plot_name: str  # compare's picture of the columns against the ratio
    artefact_names: tuple[str, ...] = ()  # the further files ``write_artefacts`` writes

    @abstractmethod
    def describe(self) -> dict:
        """The protocol, recorded with every result."""

    @abstractmethod
    def columns(self) -> list[Column]:
        """The figures shown in tables and plots, in column order."""

    @abstractmethod
    def measure(self, model) -> Measurement:
        """The figures of ``model`` (the same draws for every model, so dense and pruned compare)."""

    @abstractmethod
    def summary(self, dense: dict[str, float], pruned: dict[str, float]) -> list[str]:
        """The lines ``prune`` prints for the dense and the pruned model's figures."""

    def compared(self, dense: dict[str, float], pruned: dict[str, float]) -> dict:
        """The dense-vs-pruned record of pruning_report.json."""
        return {"dense": dense, "pruned": pruned, "protocol": self.describe()}

    def write_artefacts(self, artefacts: dict[str, object], folder: Path) -> None:  # noqa: B027 (optional: most keep none)
        """Write ``artefact_names`` into ``folder`` from every model's artefact (``{model name: artefact}``)."""
