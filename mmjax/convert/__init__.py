"""Importers of pretrained weights from other frameworks."""
