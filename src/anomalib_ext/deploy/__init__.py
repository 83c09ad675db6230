"""Deployment helpers: inferencers for exported models whose masks are decided outside the graph."""

from .nfa_inferencer import NFAInferencer, apply_nfa, nfa_export_outputs

__all__ = ["NFAInferencer", "apply_nfa", "nfa_export_outputs"]
