"""Rendering only: tables for people, versioned JSON/YAML documents for scripts, Graphviz dot."""
