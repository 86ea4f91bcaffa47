"""`medusa-forge eval` (cli.py): head accuracy (accuracy.py), the tree chosen by latency and the timed runs against
greedy and prompt lookup (speed.py), eval.json, eval.md and plots (report.py; the report's dataclass is
medusa_forge.results.EvalReport)."""
