"""Tracking searches and trials in MLflow."""
