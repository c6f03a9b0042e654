"""Evaluations beyond the standard metrics: adversarial attacks and the robustness report."""
