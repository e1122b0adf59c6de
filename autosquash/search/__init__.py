"""The search: experiment and search-space files, the Optuna study, the Ray runner, the Pareto front."""
