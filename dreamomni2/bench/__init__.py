"""DreamOmni2Bench through the service: `dreamomni2 bench BENCH_DIR OUT_DIR`.

`discovery` finds the cases (the published folders, or cases.jsonl), `results` keeps OUT_DIR (what
a rerun resumes from), `runner` submits and waits, `summary` and `report` write what came of it,
`judge_client` asks an external OpenAI-compatible VLM, and `command` is the command's body.
"""
