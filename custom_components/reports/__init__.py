"""Human-readable reports built from the files the bundles write (static, offline HTML)."""

from custom_components.reports.explanation_html import discover_runs, write_explanation_report

__all__ = ["discover_runs", "write_explanation_report"]
